"""`python -m tunejax.main` errors: one line, non-zero exit, no traceback."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _main(*flags, workdir):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "tunejax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("flag,expect", [
    ("--config.optim.lrr=0.1", "lrr"),               # unknown key
    ("--config.optim.lr=fast", "lr"),                # wrong type
    ("--config.model.name=/no/such/model", "config.model.name"),
    ("--config.loss.name=nope", "config.loss.name"),
    ("--config.peft.method=loraa", "config.peft.method"),
])
def test_bad_config_is_one_line(flag, expect, tmp_path):
  p = _main(flag, "--config.total_steps=1", workdir=str(tmp_path))
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  assert expect in p.stderr
  err = [l for l in p.stderr.splitlines()
         if "error" in l.lower() or expect in l]
  assert err and len(err[-1]) < 400


def test_unwritable_workdir(tmp_path):
  ro = tmp_path / "ro"
  ro.mkdir()
  os.chmod(ro, 0o500)
  if os.access(ro, os.W_OK):  # root ignores permissions: use a file instead
    ro = tmp_path / "file"
    ro.write_text("x")
  p = _main("--config.total_steps=1", workdir=str(ro / "wd"))
  assert p.returncode != 0
  assert "Traceback" not in p.stderr
  assert "--workdir" in p.stderr
