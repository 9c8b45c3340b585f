"""End to end on the tiny model: sft -> export / eval / generate, plot."""
import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest

from tunejax import errors, models, plot, train, tree
from tunejax.train import metrics as metrics_lib
from tests.train.helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("tasks"))
  cfg = tiny_config(total_steps=4,
                    peft={"method": "lora", "rank": 4, "alpha": 8.0},
                    checkpoint={"export_at_end": True, "async_save": False},
                    log={"tensorboard": True},
                    eval={"every": 2, "generate_examples": 4,
                          "data": {"format": "prompt_answer"}})
  return cfg, wd, train.run(cfg, wd)


def test_metrics_and_files(trained):
  _, wd, _ = trained
  rows = metrics_lib.read(wd)
  train_rows = [r for r in rows if "loss" in r]
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  cfg, _, _ = trained
  # LoRA: a frozen base, so the model FLOPs count no weight gradients.
  flops = models.preset("tiny").replace(vocab_size=259).flops_per_token(
      cfg.data.seq_len, weight_grads=False)
  for r in train_rows:
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "tflops"} <= set(r)
    np.testing.assert_allclose(r["tflops"],
                               flops * r["tokens_per_sec"] / 1e12, rtol=1e-6)
  # Compilation is reported once, on the first row, not in the rates.
  assert [("first_step_s" in r) for r in train_rows] == [True] + [False] * 3
  assert [r["step"] for r in eval_rows] == [0, 2, 4]
  assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in eval_rows)
  for f in ("config.json", "final_metrics.json", "checkpoints"):
    assert os.path.exists(os.path.join(wd, f))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tb")))
  assert os.path.getsize(plot.plot(wd)) > 1000


def test_eval_rows_are_printed(tmp_path, capsys):
  w = metrics_lib.MetricsWriter(str(tmp_path), total_steps=2,
                                tensorboard=False, progress=False)
  w.write(1, {"loss": 2.0})
  w.write(2, {"eval/loss": 0.25, "eval/accuracy": 0.625})
  w.close()
  assert capsys.readouterr().out == (
      "eval @ step 2: loss 0.25  accuracy 0.625\n")
  assert len(metrics_lib.read(str(tmp_path))) == 2


def test_throughput_leaves_out_compilation_and_pauses():
  rate = metrics_lib.Throughput()
  time.sleep(0.3)  # the first step: compilation
  rate.step_done(100.0, jax.numpy.zeros(3), log_now=False)
  rate.step_done(50.0, jax.numpy.zeros(3), log_now=False)
  with rate.pause(jax.numpy.zeros(3)):  # an eval or a checkpoint save
    time.sleep(0.3)
  row = rate.row()
  assert row["first_step_s"] >= 0.3
  assert row["tokens_per_sec"] > 50.0 / 0.1  # 50 tokens, ~no seconds
  assert "first_step_s" not in rate.row()


def test_export_is_the_merged_model(trained):
  _, wd, out = trained
  _, params = models.load(os.path.join(wd, "export", "hf"))
  run, state = out["run"], out["state"]
  want = jax.device_get(run.method.merged(state.params, state.frozen))
  got, want = tree.flatten(params), tree.flatten(want)
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


def test_eval_and_generate_tasks_use_the_checkpoint(trained, capsys):
  cfg, wd, out = trained
  res = train.run(dataclasses.replace(cfg, task="eval"), wd)
  last_eval = [r for r in metrics_lib.read(wd) if "eval/loss" in r][-1]
  np.testing.assert_allclose(res["metrics"]["eval/loss"],
                             last_eval["eval/loss"], rtol=1e-5)
  gen = dataclasses.replace(cfg, task="generate", eval=dataclasses.replace(
      cfg.eval, prompts=("12+34=", "7+8="), max_new_tokens=3))
  res = train.run(gen, wd)
  lines = open(os.path.join(wd, "generate.jsonl")).read().splitlines()
  assert [json.loads(l)["prompt"] for l in lines] == ["12+34=", "7+8="]
  assert len(res["texts"]) == 2
  # Sampled: two completions per prompt, grouped by prompt.
  gen = dataclasses.replace(gen, eval=dataclasses.replace(
      gen.eval, temperature=1.0, top_k=5, top_p=0.9, num_samples=2))
  train.run(gen, wd)
  rows = [json.loads(l) for l in
          open(os.path.join(wd, "generate.jsonl")).read().splitlines()]
  assert [(r["prompt"], r["sample"]) for r in rows] == [
      ("12+34=", 0), ("12+34=", 1), ("7+8=", 0), ("7+8=", 1)]
  with pytest.raises(errors.ConfigError, match="config.eval.num_samples"):
    tiny_config(eval={"num_samples": 0})


def test_nan_loss_is_one_clear_error(tmp_path):
  cfg = tiny_config(total_steps=4, optim={"name": "sgd", "lr": 1e30,
                                          "clip_norm": 0.0},
                    eval={"every": -1})
  with pytest.raises(errors.NonFiniteLossError, match=r"step \d: loss is"):
    train.run(cfg, str(tmp_path))


def test_compile_cache_serves_a_later_run(tmp_path, monkeypatch):
  """config.compile_cache: a run stores its compiled programs there; a
  later run (in-memory caches dropped, as in a new process) loads every
  one of them instead of compiling."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  from tunejax.train import setup  # pylint: disable=g-import-not-at-top
  asked, hit = "/jax/compilation_cache/compile_requests_use_cache", (
      "/jax/compilation_cache/cache_hits")
  events = []
  listen = lambda name, **_: events.append(name)
  jax.monitoring.register_event_listener(listen)
  monkeypatch.setattr(setup, "_RUNS", {})
  min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  cache = tmp_path / "xla"
  cfg = tiny_config(total_steps=2, compile_cache=str(cache))
  jax.clear_caches()  # earlier tests' programs: compiled here, not loaded
  try:
    train.run(cfg, str(tmp_path / "a"))
    assert events.count(asked) > 0 and events.count(hit) == 0
    stored = sorted(os.listdir(cache))
    assert stored
    jax.clear_caches()
    setup._RUNS.clear()  # pylint: disable=protected-access
    events.clear()
    train.run(cfg, str(tmp_path / "b"))
    assert events.count(hit) == events.count(asked) > 0
    assert sorted(os.listdir(cache)) == stored
  finally:
    jax.monitoring.unregister_event_listener(listen)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def test_unusable_compile_cache_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(errors.ConfigError, match="config.compile_cache"):
    train.run(tiny_config(compile_cache=str(tmp_path / "file" / "xla")),
              str(tmp_path / "wd"))
