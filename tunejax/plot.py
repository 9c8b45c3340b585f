"""`python -m tunejax.plot WORKDIR [--out=curves.png]`: plot metrics.jsonl."""
from __future__ import annotations

import os
import sys

from tunejax.train.metrics import read

_PANELS = (("loss", "eval/loss"), ("lr",), ("grad_norm",),
           ("tokens_per_sec",), ("eval/accuracy",))


def plot(workdir: str, out: str | None = None) -> str:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = read(workdir)
  panels = [keys for keys in _PANELS
            if any(k in r for r in rows for k in keys)]
  fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2),
                           squeeze=False)
  for ax, keys in zip(axes[0], panels):
    for k in keys:
      pts = [(r["step"], r[k]) for r in rows if k in r]
      if pts:
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(pts) < 30 else None, label=k)
    ax.set_xlabel("step")
    ax.set_title(" / ".join(keys))
    ax.grid(alpha=0.3)
    if len(keys) > 1:
      ax.legend()
  fig.tight_layout()
  out = out or os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  if not argv:
    print("usage: python -m tunejax.plot WORKDIR [--out=FILE]", file=sys.stderr)
    sys.exit(2)
  out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), None)
  wd = next(a for a in argv if not a.startswith("--"))
  if not os.path.exists(os.path.join(wd, "metrics.jsonl")):
    print(f"tunejax: error: {wd}/metrics.jsonl not found", file=sys.stderr)
    sys.exit(2)
  print(plot(wd, out))


if __name__ == "__main__":
  main()
