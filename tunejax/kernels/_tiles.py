"""Tile math shared by every implementation of the token-loss op.

All functions act on one logit tile `s_TxU` (T tokens x U vocabulary
columns, float32) with per-token vectors kept as `[T, 1]` columns, because
Pallas TPU (Mosaic) bodies handle 2-D values best; the XLA path uses the
same functions, so the numerics of every backend are one piece of code.

Notation: z = h @ w (raw logits), s = softcap(z) / temperature (the scaled
logits the distribution is defined on), p = softmax(s), lse = logsumexp(s).
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: keeps `(m_old - m_new) * l_old` and
# `exp(m_old - m_new)` free of inf - inf = NaN on the first tile.
NEG = -1e30

# Columns of the per-token coefficient matrix that the backward pass reads
# (see `stats_coefs`); padded to 8 so a Pallas TPU block is (rows, 8).
N_COEFS = 8
A, B, C, E, LSE, ENT = range(6)


class Scaling(NamedTuple):
  """Static logit transform: s = softcap * tanh(z / softcap) / temperature."""
  softcap: float | None = None
  temperature: float = 1.0


def scale_logits(z, sc: Scaling):
  if sc.softcap is not None:
    z = sc.softcap * jnp.tanh(z / sc.softcap)
  if sc.temperature != 1.0:
    z = z / sc.temperature
  return z


def unscale_grad(g_s, s, sc: Scaling):
  """Chain rule from d/ds back to d/dz, using s itself (no tanh recompute)."""
  if sc.temperature != 1.0:
    g_s = g_s / sc.temperature
  if sc.softcap is not None:
    capped = s * sc.temperature  # = softcap * tanh(z / softcap)
    g_s = g_s * (1.0 - jnp.square(capped / sc.softcap))
  return g_s


def common_dtype(*arrays):
  """Casts matmul operands to one dtype (e.g. bf16 activations with f32
  master weights); autodiff casts the cotangents back."""
  dtype = jnp.result_type(*arrays)
  return tuple(x.astype(dtype) for x in arrays)


def pad_rows(x, rows, value=0):
  """x padded with `value` to `rows` rows (tokens pad to whole blocks)."""
  if x.shape[0] == rows:
    return x
  widths = [(0, rows - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
  return jnp.pad(x, widths, constant_values=value)


def matmul(h, w):
  """Logit tile with float32 accumulation whatever the input dtype."""
  return jax.lax.dot_general(
      h, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def matmul_nt(g, w):
  """g @ w.T with float32 accumulation (gradient w.r.t. h)."""
  return jax.lax.dot_general(
      g.astype(w.dtype), w, (((1,), (1,)), ((), ())),
      preferred_element_type=jnp.float32)


def matmul_tn(h, g):
  """h.T @ g with float32 accumulation (gradient w.r.t. w)."""
  return jax.lax.dot_general(
      h, g.astype(h.dtype), (((0,), (0,)), ((), ())),
      preferred_element_type=jnp.float32)


def col_ids(shape, v0):
  """Global vocabulary ids of a tile's columns, as an int32 tile."""
  return v0 + jax.lax.broadcasted_iota(jnp.int32, shape, 1)


# ----------------------------------------------------------------------------
# Forward: online (streaming over vocabulary tiles) per-token statistics.


class Stats(NamedTuple):
  """Running per-token accumulators, each `[T, 1]` float32."""
  m: jax.Array      # running max of s
  l: jax.Array      # sum exp(s - m)
  ent: jax.Array    # sum exp(s - m) * (s - m)   (for the entropy)
  total: jax.Array  # sum s                      (for label smoothing)
  tgt: jax.Array    # s at the target column (0 if ignored / not seen)


def init_stats(rows):
  zeros = jnp.zeros((rows, 1), jnp.float32)
  return Stats(jnp.full((rows, 1), NEG, jnp.float32), zeros, zeros, zeros,
               zeros)


def online_max(m, s, col_ok):
  """One streaming-softmax step.

  Returns the new running max, the factor exp(m_old - m_new) that re-bases
  old sums, s - m_new (NEG-safe) and exp(s - m_new) (0 outside col_ok).
  """
  s_ok = jnp.where(col_ok, s, NEG)
  m_new = jnp.maximum(m, jnp.max(s_ok, axis=1, keepdims=True))
  rel = s_ok - m_new
  return m_new, jnp.exp(m - m_new), rel, jnp.where(col_ok, jnp.exp(rel), 0.0)


def update_stats(st: Stats, s, cols, col_ok, y):
  """Folds one tile into the running stats.

  Args:
    st: running stats.
    s: scaled logits tile [T, U] float32.
    cols: global column ids [T, U].
    col_ok: bool [T, U] (or broadcastable), False for padding columns and for
      columns an earlier tile already covered.
    y: targets [T, 1] int32 (-1 never matches a column).
  """
  m_new, scale, rel, p_un = online_max(st.m, s, col_ok)
  l = st.l * scale + jnp.sum(p_un, axis=1, keepdims=True)
  # Re-centre the old entropy sum on the new max (see module notes).
  ent = (st.ent + (st.m - m_new) * st.l) * scale + jnp.sum(
      p_un * jnp.where(col_ok, rel, 0.0), axis=1, keepdims=True)
  total = st.total + jnp.sum(jnp.where(col_ok, s, 0.0), axis=1, keepdims=True)
  hit = jnp.logical_and(col_ok, cols == y)
  tgt = st.tgt + jnp.sum(jnp.where(hit, s, 0.0), axis=1, keepdims=True)
  return Stats(m_new, l, ent, total, tgt)


def merge_stats(parts: Stats) -> Stats:
  """Combines stats of disjoint column sets, `[T, S]` each, into `[T, 1]`
  (an empty set, m = NEG and l = 0, contributes nothing)."""
  m = jnp.max(parts.m, axis=1, keepdims=True)
  scale = jnp.exp(parts.m - m)
  total = lambda x: jnp.sum(x, axis=1, keepdims=True)
  # Each part's entropy sum is centred on its own max: re-centre on m.
  return Stats(m, total(parts.l * scale),
               total((parts.ent + (parts.m - m) * parts.l) * scale),
               total(parts.total), total(parts.tgt))


def finalize_stats(st: Stats, y, vocab):
  """-> (logp, lse, entropy, smooth), each [T, 1]; y < 0 means ignored."""
  log_l = jnp.log(st.l)
  lse = st.m + log_l
  entropy = log_l - st.ent / st.l
  smooth = st.total / vocab - lse
  logp = jnp.where(y < 0, 0.0, st.tgt - lse)
  return logp, lse, entropy, smooth


# ----------------------------------------------------------------------------
# Backward: d(sum of per-token cotangents . stats)/ds for one tile.


def stats_coefs(g_logp, g_lse, g_ent, g_smooth, valid, lse, entropy, vocab):
  """Packs per-token cotangents into the [N, 8] matrix `stats_grad` reads.

  With p = softmax(s) and onehot the target indicator,
    dlogp/ds = onehot - p,  dlse/ds = p,  dsmooth/ds = 1/V - p,
    dH/ds = -p * (log p + H),
  so the total is  a * onehot + b + p * (c - e * (log p + H))  with
  a = g_logp (0 when ignored), b = g_smooth / V, c = g_lse - a - g_smooth,
  e = g_ent.
  """
  a = jnp.where(valid, g_logp, 0.0)
  cols = [a, g_smooth / vocab, g_lse - a - g_smooth, g_ent, lse, entropy]
  n = a.shape[0]
  cols += [jnp.zeros((n,), jnp.float32)] * (N_COEFS - len(cols))
  return jnp.stack([c.astype(jnp.float32) for c in cols], axis=1)


def stats_grad(s, cols, ok, y, coef):
  """Gradient w.r.t. the scaled logits s of one tile; 0 where not `ok`.

  Args:
    s: scaled logits [T, U] float32.
    cols: global column ids [T, U].
    ok: bool tile, False for padding rows/columns (and overlap columns).
    y: targets [T, 1] int32.
    coef: [T, 8] float32 rows of `stats_coefs`, as an array or a Pallas
      ref (read column by column: Triton cannot slice loaded values).
  """
  a, b, c, e, lse, ent = (coef[:, k:k + 1] for k in (A, B, C, E, LSE, ENT))
  logp = jnp.where(ok, s - lse, NEG)
  p = jnp.exp(logp)
  g = b + p * (c - e * (logp + ent)) + jnp.where(cols == y, a, 0.0)
  return jnp.where(ok, g, 0.0)


# ----------------------------------------------------------------------------
# Forward-mode dh: with u = ds/dz (1/temperature, times 1 - tanh² under a
# softcap) and g the `stats_grad` tile,
#   dh = Σ_v g_v u_v w_v = a·u_y·w_y + b·Σ u w + (c - e·H)·Σ p u w
#        - e·Σ p log p u w,
# so streaming the moments Σ p u w (and Σ p log p u w for the entropy,
# Σ u w for smoothing under a softcap) next to the softmax statistics gives
# dh for *any* later per-token cotangents without a backward logit pass.


class Moments(NamedTuple):
  """Running `[T, D]` float32 sums over w's columns (None: not needed)."""
  pw: jax.Array                # Σ exp(s - m) u w
  plw: jax.Array | None = None  # Σ exp(s - m) (s - m) u w
  uw: jax.Array | None = None   # Σ u w


def moment_fields(cfg) -> tuple[bool, bool]:
  """Which optional moments (plw, uw) an op config needs: Σ p log p u w for
  the entropy; Σ u w for smoothing under a softcap (without one u is the
  constant 1/T, and Σ u w is a column sum of w the caller forms)."""
  return (cfg.want_entropy,
          cfg.want_smooth and cfg.scaling.softcap is not None)


def init_moments(rows, d, want_plw: bool, want_uw: bool):
  zeros = lambda: jnp.zeros((rows, d), jnp.float32)
  return Moments(zeros(), zeros() if want_plw else None,
                 zeros() if want_uw else None)


def update_moments(mo: Moments, m_old, m_new, s, col_ok, w_c,
                   sc: Scaling) -> Moments:
  """Folds one tile into the moments; (m_old, m_new) as in `update_stats`.

  `w_c` is the tile's `[D, U]` slice of w. Re-basing on a new max is the
  same as for the entropy sum of `update_stats`.
  """
  _, scale, rel, p_un = online_max(m_old, s, col_ok)
  u = unscale_grad(jnp.ones_like(s), s, sc)
  pu = p_un * u
  pw = mo.pw * scale + matmul_nt(pu, w_c)
  plw = uw = None
  if mo.plw is not None:
    plw = (mo.plw + (m_old - m_new) * mo.pw) * scale + matmul_nt(
        pu * jnp.where(col_ok, rel, 0.0), w_c)
  if mo.uw is not None:
    uw = mo.uw + matmul_nt(jnp.where(col_ok, u, 0.0), w_c)
  return Moments(pw, plw, uw)


def finalize_moments(mo: Moments, st: Stats) -> Moments:
  """-> (Σ p u w, Σ p log p u w, Σ u w) with p the final softmax."""
  pw = mo.pw / st.l
  plw = None if mo.plw is None else mo.plw / st.l - jnp.log(st.l) * pw
  return Moments(pw, plw, mo.uw)


def moments_dh(coef, mo: Moments, w_y, u_y, uw):
  """dh `[N, D]` float32 from `stats_coefs` rows and finalized moments.

  `w_y` `[N, D]` are the target columns of w, `u_y` `[N, 1]` their ds/dz,
  `uw` the Σ u w term (`[N, D]`, `[1, D]`, or None when no smoothing).
  """
  a, b, c, e, ent = (coef[:, k:k + 1] for k in (A, B, C, E, ENT))
  dh = a * u_y * w_y + (c - e * ent) * mo.pw
  if mo.plw is not None:
    dh = dh - e * mo.plw
  if uw is not None:
    dh = dh + b * uw
  return dh
