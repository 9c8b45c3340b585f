"""Sparse-delta files and task-vector merging.

Deltas: `{module: {'indices': int32 [..., k], 'values': f32 [..., k]}}`,
saved as `DIR/delta.safetensors` (tensors '<module>/indices' and
'<module>/values'). They compose by addition (LT-SFT's language + task
composition, Ansell et al. 2022): `compose` concatenates entries, and the
scatter-add of duplicates makes the result the dense sum.

Task vectors τ = θ_ft − θ_0 (dense trees, or sparse deltas densified):
  task arithmetic  θ = θ_0 + λ·Σ_t τ_t   (Ilharco et al. 2023).
  breadcrumbs      θ = θ_0 + λ·Σ_t m_t ⊙ τ_t, where per param tensor (per
                   layer of a layer-stacked one) m_t drops the `bottom` fraction
                   of smallest |τ| and the `top` fraction of largest |τ|
                   (Model Breadcrumbs, Davari & Belilovsky 2023).
  lines            τ^(ℓ) scaled by λ(ℓ) = α + β·(ℓ − 1)/(L − 1) for layers
                   ℓ = 1..L (LiNeS, Wang et al. 2024, arXiv 2410.17146).
                   Non-layer params: embeddings take the shallowest scale α,
                   the rest (final norm, head) the deepest α + β.

CLI (writes a merged HF checkpoint):
  python -m tunejax.peft.merging --base=HF_DIR --out=OUT_DIR \\
      --inputs=DELTA_DIR_OR_HF_DIR,... --method=task_arithmetic|breadcrumbs \\
      [--lam=1.0 --top=0.01 --bottom=0.9 --lines_alpha=... --lines_beta=...]
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

from tunejax import errors, tree

FILE = "delta.safetensors"


def save_delta(delta: dict, out_dir: str) -> str:
  """Writes DIR/delta.safetensors atomically; returns its path."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for m, d in delta.items():
    tensors[m + "/indices"] = np.ascontiguousarray(d["indices"], np.int32)
    tensors[m + "/values"] = np.ascontiguousarray(d["values"], np.float32)
  fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".tmp")
  os.close(fd)
  save_file(tensors, tmp, metadata={"format": "tunejax-sparse-delta"})
  path = os.path.join(out_dir, FILE)
  os.replace(tmp, path)
  return path


def load_delta(path: str) -> dict:
  """Reads a delta dir (or its .safetensors file)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  f = os.path.join(path, FILE) if os.path.isdir(path) else path
  if not os.path.exists(f):
    raise errors.CheckpointError(f"{f}: no sparse delta file")
  out: dict = {}
  for name, x in load_file(f).items():
    m, kind = name.rsplit("/", 1)
    if kind not in ("indices", "values"):
      raise errors.CheckpointError(f"{f}: unexpected tensor '{name}'")
    out.setdefault(m, {})[kind] = x
  for m, d in out.items():
    if set(d) != {"indices", "values"} or d["indices"].shape != \
        d["values"].shape:
      raise errors.CheckpointError(
          f"{f}: module '{m}' needs same-shaped indices and values")
  return out


def compose(*deltas: dict, weights=None) -> dict:
  """Σ_t w_t·Δ_t as one delta (entries concatenated per module)."""
  weights = [1.0] * len(deltas) if weights is None else list(weights)
  out: dict = {}
  for w, d in zip(weights, deltas):
    for m, e in d.items():
      vals = np.asarray(e["values"], np.float32) * np.float32(w)
      if m in out:
        out[m] = {"indices": np.concatenate([out[m]["indices"],
                                             e["indices"]], -1),
                  "values": np.concatenate([out[m]["values"], vals], -1)}
      else:
        out[m] = {"indices": np.asarray(e["indices"], np.int32),
                  "values": vals}
  return out


def densify(delta: dict, params: dict) -> dict:
  """The dense task vector of a delta: {'<module>/kernel': array} (float32)
  for the modules it touches (duplicates add)."""
  flat = tree.flatten(params)
  out = {}
  for m, e in delta.items():
    name = m + "/kernel"
    if name not in flat:
      raise errors.CheckpointError(f"delta module '{m}': no kernel '{name}'")
    shape = flat[name].shape
    idx, vals = np.asarray(e["indices"]), np.asarray(e["values"], np.float32)
    if idx.shape[:-1] != tuple(shape[:-2]) or (
        idx.size and (idx.min() < 0 or idx.max() >= shape[-2] * shape[-1])):
      raise errors.CheckpointError(
          f"delta module '{m}': indices {idx.shape} do not fit {shape}")
    dense = np.zeros((int(np.prod(shape[:-2], dtype=int)),
                      shape[-2] * shape[-1]), np.float32)
    for row, (i, v) in enumerate(zip(idx.reshape(dense.shape[0], -1),
                                     vals.reshape(dense.shape[0], -1))):
      np.add.at(dense[row], i, v)
    out[name] = dense.reshape(shape)
  return out


def task_vector(finetuned: dict, base: dict) -> dict:
  """{name: θ_ft − θ_0} (float32) over the base's params."""
  fb, ff = tree.flatten(base), tree.flatten(finetuned)
  return {n: np.asarray(ff[n], np.float32) - np.asarray(w, np.float32)
          for n, w in fb.items()}


def breadcrumbs_mask(tau: np.ndarray, top: float, bottom: float,
                     per_layer: bool) -> np.ndarray:
  """Keeps entries between the `bottom` and 1 − `top` quantiles of |τ|,
  per matrix (per layer slice when `per_layer`); ties by position."""
  a = np.abs(np.asarray(tau))
  rows = a.reshape(a.shape[0], -1) if per_layer and a.ndim >= 2 \
      else a.reshape(1, -1)
  keep = np.zeros(rows.shape, bool)
  n = rows.shape[1]
  lo, hi = int(np.floor(bottom * n)), n - int(np.floor(top * n))
  for r, row in enumerate(rows):
    order = np.argsort(row, kind="stable")
    keep[r, order[lo:hi]] = True
  return keep.reshape(a.shape)


def lines_scale(name: str, shape, alpha: float, beta: float):
  """LiNeS scale of a param: [L, 1, ...] for layer-stacked leaves."""
  if name.startswith("layers/"):
    n = shape[0]
    lam = alpha + beta * np.arange(n) / max(n - 1, 1)
    return lam.reshape(n, *([1] * (len(shape) - 1)))
  return alpha if name.startswith("embed/") else alpha + beta


def merge(base: dict, taus: list[dict], *, method: str = "task_arithmetic",
          lam: float = 1.0, top: float = 0.0, bottom: float = 0.0,
          lines: tuple[float, float] | None = None) -> dict:
  """θ_0 + λ·Σ_t (mask_t ⊙) τ_t, then optionally LiNeS-scaled per layer.

  `taus` are {name: dense array} (from `task_vector` or `densify`); names
  a task vector lacks are zero there. With `lines=(α, β)` the merged sum
  is scaled by λ(ℓ) instead of the scalar `lam`.
  """
  if method not in ("task_arithmetic", "breadcrumbs"):
    raise errors.ConfigError(f"merging: unknown method '{method}'")
  flat = tree.flatten(base)
  out = {}
  for n, w in flat.items():
    total = np.zeros(np.shape(w), np.float32)
    for tau in taus:
      if n not in tau:
        continue
      t = np.asarray(tau[n], np.float32)
      if method == "breadcrumbs":
        t = t * breadcrumbs_mask(t, top, bottom, n.startswith("layers/"))
      total += t
    scale = lam if lines is None else lines_scale(n, np.shape(w), *lines)
    out[n] = (np.asarray(w, np.float32) + scale * total).astype(
        np.asarray(w).dtype)
  return tree.unflatten(out)


def _taus(inputs, cfg_params):
  from tunejax import models  # pylint: disable=g-import-not-at-top
  out = []
  for path in inputs:
    if os.path.exists(os.path.join(path, FILE)) or path.endswith(
        ".safetensors") and "delta" in os.path.basename(path):
      out.append(densify(load_delta(path), cfg_params))
    else:
      _, ft = models.load(path)
      out.append(task_vector(ft, cfg_params))
  return out


def main(argv=None):
  from tunejax import models  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--base", required=True, help="HF checkpoint dir of θ_0")
  p.add_argument("--inputs", required=True,
                 help="comma-separated sparse-delta dirs or fine-tuned HF dirs")
  p.add_argument("--out", required=True)
  p.add_argument("--method", default="task_arithmetic",
                 choices=["task_arithmetic", "breadcrumbs"])
  p.add_argument("--lam", type=float, default=1.0)
  p.add_argument("--top", type=float, default=0.01)
  p.add_argument("--bottom", type=float, default=0.9)
  p.add_argument("--lines_alpha", type=float, default=None)
  p.add_argument("--lines_beta", type=float, default=None)
  a = p.parse_args(argv)
  cfg, base = models.load(a.base)
  lines = None
  if a.lines_alpha is not None or a.lines_beta is not None:
    lines = (a.lines_alpha or 0.0, a.lines_beta or 0.0)
  merged = merge(base, _taus(a.inputs.split(","), base), method=a.method,
                 lam=a.lam, top=a.top, bottom=a.bottom, lines=lines)
  models.save_hf(cfg, merged, a.out)
  print(f"merged {a.inputs} into {a.out}")


if __name__ == "__main__":
  main()
