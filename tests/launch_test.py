"""launch/: sweep commands and runs, and the TPU VM / SLURM launchers'
command lines (with gcloud and srun replaced by recorders)."""
import json
import os
import shlex
import stat
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(*flags, workdir, timeout=600):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "launch/sweep.py", "--config=configs/tiny.py",
       f"--workdir={workdir}", *flags], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=timeout)


def test_sweep_prints_one_command_per_grid_point(tmp_path):
  p = _sweep("--grid=optim.lr=1e-3,3e-3;peft.rank=4,8", "--mode=print",
             workdir=tmp_path)
  assert p.returncode == 0, p.stderr
  cmds = [shlex.split(l) for l in p.stdout.splitlines()]
  assert len(cmds) == 4
  points = {tuple(a for a in c if a.startswith("--config.")) for c in cmds}
  assert points == {("--config.optim.lr=" + lr, "--config.peft.rank=" + r)
                    for lr in ("1e-3", "3e-3") for r in ("4", "8")}
  workdirs = {a for c in cmds for a in c if a.startswith("--workdir=")}
  assert len(workdirs) == 4  # one sub-workdir per point
  assert all(c[1:3] == ["-m", "tunejax.main"] for c in cmds)
  sample = _sweep("--grid=optim.lr=1e-3,3e-3;peft.rank=4,8", "--random=2",
                  "--seed=0", workdir=tmp_path)
  again = _sweep("--grid=optim.lr=1e-3,3e-3;peft.rank=4,8", "--random=2",
                 "--seed=0", workdir=tmp_path)
  lines = sample.stdout.splitlines()
  assert len(lines) == 2 and lines == again.stdout.splitlines()
  assert set(lines) <= set(p.stdout.splitlines())


def test_sweep_runs_locally_and_counts_failures(tmp_path):
  p = _sweep("--grid=optim.lr=1e-3,fast", "--mode=local", "--",
             "--config.total_steps=2", "--config.eval.every=-1",
             "--config.log.every=1",
             workdir=tmp_path)
  assert p.returncode != 0
  assert "1 of 2 jobs failed" in p.stderr
  rows = [json.loads(l) for l in
          (tmp_path / "lr=1e-3" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert "config.optim.lr" in p.stderr  # the failed job's one-line error


def _recorder(bin_dir, name):
  """An executable `name` that appends its argv (JSON) to name.log."""
  bin_dir.mkdir(exist_ok=True)
  exe = bin_dir / name
  exe.write_text(f"#!{sys.executable}\nimport json, sys\n"
                 f"open({str(bin_dir / (name + '.log'))!r}, 'a').write("
                 "json.dumps(sys.argv[1:]) + '\\n')\n")
  exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
  return bin_dir / (name + ".log")


def _calls(log):
  return [json.loads(l) for l in log.read_text().splitlines()]


def _launch(script, *args, bin_dir):
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
  return subprocess.run(["bash", script, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_tpu_vm_runs_the_same_command_on_every_worker(tmp_path):
  log = _recorder(tmp_path / "bin", "gcloud")
  for args in (["create", "tj", "us-a", "v5litepod-16"],
               ["run", "tj", "us-a", "--", "--config=configs/tiny.py",
                "--workdir=gs://b/run 1"]):
    p = _launch("launch/tpu_vm.sh", *args, bin_dir=tmp_path / "bin")
    assert p.returncode == 0, p.stderr
  create, run = _calls(log)
  assert create == ["compute", "tpus", "tpu-vm", "create", "tj",
                    "--accelerator-type=v5litepod-16",
                    "--version=tpu-ubuntu2204-base", "--zone=us-a"]
  assert run[:6] == ["compute", "tpus", "tpu-vm", "ssh", "tj",
                     "--worker=all"] and run[-1] == "--zone=us-a"
  remote = run[6]
  assert remote.startswith("--command=cd ~/tunejax && ")
  # The remote shell gets the arguments quoted (the space survives).
  assert shlex.split(remote.split("&&", 1)[1]) == [
      "python3", "-m", "tunejax.main", "--distributed",
      "--config=configs/tiny.py", "--workdir=gs://b/run 1"]


def test_gpu_slurm_starts_one_distributed_process_per_task(tmp_path):
  log = _recorder(tmp_path / "bin", "srun")
  p = _launch("launch/gpu_slurm.sh", "--config=configs/tiny.py",
              "--workdir=/shared/x", bin_dir=tmp_path / "bin")
  assert p.returncode == 0, p.stderr
  assert _calls(log) == [["--kill-on-bad-exit=1", "python", "-m",
                          "tunejax.main", "--distributed",
                          "--config=configs/tiny.py", "--workdir=/shared/x"]]
