"""Grid or random sweeps over `--config.*` overrides.

  python launch/sweep.py --config=configs/tiny.py --workdir=/tmp/sweep \
      --grid='optim.lr=1e-3,3e-3;peft.rank=4,8' [--random=4 --seed=0] \
      [--mode=local|print]

`local` runs the jobs one by one here; `print` writes one command per line
(pipe it to a scheduler, xargs -P, or launch/tpu_vm.sh). Each job gets its
own sub-workdir named after its overrides.
"""
import itertools
import random
import shlex
import subprocess
import sys

from absl import app, flags

_CONFIG = flags.DEFINE_string("config", None, "Config file.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep root.", required=True)
_GRID = flags.DEFINE_string("grid", "", "'key=v1,v2;key2=v3,v4'")
_RANDOM = flags.DEFINE_integer("random", 0, "Sample N grid points (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for --random.")
_MODE = flags.DEFINE_enum("mode", "print", ["local", "print"], "What to do.")


def parse_grid(spec: str) -> list[tuple[str, list[str]]]:
  axes = []
  for part in filter(None, spec.split(";")):
    key, _, values = part.partition("=")
    if not values:
      raise app.UsageError(f"--grid: '{part}' needs key=v1,v2")
    axes.append((key.strip(), values.split(",")))
  return axes


def points(axes, n_random: int, seed: int) -> list[dict]:
  grid = [dict(zip([k for k, _ in axes], combo))
          for combo in itertools.product(*[v for _, v in axes])]
  if n_random and n_random < len(grid):
    grid = random.Random(seed).sample(grid, n_random)
  return grid


def command(point: dict, extra: list[str]) -> list[str]:
  name = "_".join(f"{k.split('.')[-1]}={v}" for k, v in point.items()) or "base"
  return ([sys.executable, "-m", "tunejax.main", f"--config={_CONFIG.value}",
           f"--workdir={_WORKDIR.value}/{name}"]
          + [f"--config.{k}={v}" for k, v in point.items()] + extra)


def main(argv):
  extra = argv[1:]
  jobs = [command(p, extra)
          for p in points(parse_grid(_GRID.value), _RANDOM.value, _SEED.value)]
  failed = 0
  for cmd in jobs:
    if _MODE.value == "print":
      print(shlex.join(cmd))
    else:
      print("+", shlex.join(cmd), flush=True)
      failed += subprocess.run(cmd, check=False).returncode != 0
  if failed:
    sys.exit(f"{failed} of {len(jobs)} jobs failed")


if __name__ == "__main__":
  app.run(main)
