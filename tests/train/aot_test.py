"""task=compile: the train step compiled on the run's mesh, nothing trained."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tunejax import errors, models, train
from tunejax.train import config as tcfg
from tests.train import configs_test
from tests.train.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
LORA = {"method": "lora", "rank": 4, "alpha": 8.0}


def _report(tmp_path, name, **sections):
  wd = str(tmp_path / name)
  out = train.run(tiny_config(task="compile", peft=LORA, **sections), wd)
  with open(os.path.join(wd, "compile.json")) as f:
    assert json.load(f) == out
  assert not os.path.exists(os.path.join(wd, "checkpoints"))
  return out


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("aot")
  assert jax.device_count() == 8
  return (_report(tmp, "fsdp", mesh={"data": 1, "fsdp": 8, "tensor": 1}),
          _report(tmp, "data", mesh={"data": 8, "fsdp": 1, "tensor": 1}))


def test_state_bytes_agree_with_xla(reports):
  for r in reports:
    # XLA's argument bytes = the state's shards (our count) + one device's
    # batch rows (5 int32/float32 [1, 16] arrays; 8 rows over 8 devices);
    # the step key is pruned (jit drops unused arguments: no dropout here).
    assert r["argument_bytes"] == (r["state_bytes_per_device"]["total"]
                                   + 5 * 16 * 4)
    # The donated state aliases its outputs.
    assert r["alias_bytes"] == r["state_bytes_per_device"]["total"]
    assert r["peak_bytes_per_device"] == (
        r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
        + r["temp_bytes"])
    assert r["temp_bytes"] > 0 and r["compiler_flops_per_device"] > 0
    assert r["memory_limit_bytes"] is None and r["fits"] is None  # CPU
    assert r["devices"] == 8 and r["tokens_per_step"] == 8 * 16


def test_fsdp_splits_the_frozen_base(reports):
  fsdp, data = (r["state_bytes_per_device"] for r in reports)
  cfg = models.preset("tiny").replace(vocab_size=259)
  base = sum(int(np.prod(s.shape)) * 4
             for s in models.param_specs(cfg).values())
  assert data["frozen"] == base  # replicated on every device
  # FSDP: about 1/8 each (norm scales and other small leaves replicate).
  assert base / 8 <= fsdp["frozen"] < base / 8 * 1.2
  assert fsdp["params"] < data["params"]


def test_cli_reads_only_the_config_of_a_checkpoint(tmp_path):
  """A checkpoint dir whose tensors are missing still compiles: task=compile
  reads config.json only; task=sft on it fails with one line."""
  cfg = models.preset("tiny").replace(vocab_size=259)
  ckpt = str(tmp_path / "ckpt")
  models.save_hf(cfg, models.init(cfg, jax.random.PRNGKey(0)), ckpt)
  for f in glob.glob(os.path.join(ckpt, "*.safetensors")):
    os.remove(f)
  run = lambda task: subprocess.run(
      [sys.executable, "-m", "tunejax.main", "--config=configs/tiny.py",
       f"--workdir={tmp_path / task}", f"--config.task={task}",
       f"--config.model.name={ckpt}", "--config.total_steps=1"],
      cwd=ROOT, env=dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu"),
      capture_output=True, text=True, timeout=300)
  p = run("compile")
  assert p.returncode == 0, p.stderr[-2000:]
  line = [l for l in p.stdout.splitlines() if l.startswith("compiled")]
  assert len(line) == 1 and "1 x cpu" in line[0], p.stdout
  assert json.loads((tmp_path / "compile" / "compile.json").read_text())[
      "tokens_per_step"] == 8 * 32
  p = run("sft")
  assert p.returncode != 0 and "Traceback" not in p.stderr
  assert "safetensors" in p.stderr.splitlines()[-1], p.stderr[-500:]


@pytest.mark.parametrize("recipe", ["gemma3_tpu.py", "qwen_tpu.py"])
def test_tpu_recipe_fits_a_16_gib_chip(recipe, tmp_path):
  """The 8-chip recipes compile and fit a v5e chip's 16 GiB (compiled for
  CPU, which runs bf16 products through float32: an over-estimate)."""
  c = configs_test.load(os.path.join(ROOT, "configs", recipe))
  c.task = "compile"
  c.compile_cache = ""  # not the recipe's ~/.cache
  c.data.source, c.data.format = "synthetic", "prompt_completion"
  c.model.tokenizer = "byte"
  r = train.run(tcfg.from_configdict(c), str(tmp_path))
  assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["peak_bytes_per_device"] < 16 * 2**30


def test_dpo_step_compiles_and_precomputed_reference_is_one_line(tmp_path):
  c = configs_test.load(os.path.join(ROOT, "configs", "tiny_dpo.py"))
  c.task = "compile"
  r = train.run(tcfg.from_configdict(c), str(tmp_path / "online"))
  assert r["tokens_per_step"] == 2 * 8 * 48  # chosen + rejected rows
  c.loss.reference = "precomputed"
  with pytest.raises(errors.ConfigError, match="loss.reference=online"):
    train.run(tcfg.from_configdict(c), str(tmp_path / "pre"))
