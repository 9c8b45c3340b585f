"""Low-rank math shared by the LoRA family: inits, norms, deltas.

Layout: kernels are `[..., in, out]` (y = x W), A is `[..., in, r]`, B is
`[..., r, out]`; leading axes (the layer stack) are batched throughout. PEFT
stores the transposes (`lora_A.weight` [r, in], `lora_B.weight` [out, r]).
All functions compute in float32 and are jit-able.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from tunejax import sharding
from tunejax.models import seam


def _t(x):
  return jnp.swapaxes(x, -1, -2)


def _whole(w):
  """float32 and replicated: LAPACK-backed SVD / QR on an operand sharded
  over the fake CPU mesh hung in testing, so factorise a gathered copy
  (once, at init)."""
  return sharding.constrain(w.astype(jnp.float32), (None,) * w.ndim)


def kaiming_a(key, d_in: int, r: int, lead=(), dtype=jnp.float32):
  """PEFT's default A: kaiming_uniform(a=sqrt(5)) on [r, in] = U(±1/sqrt(in))."""
  bound = 1.0 / math.sqrt(d_in)
  return jax.random.uniform(key, (*lead, d_in, r), dtype, -bound, bound)


def col_norm(w_IxO):
  """L2 norm of each output column over the input axis: DoRA's ||W||_c.

  PEFT's `torch.linalg.norm(W_pt, dim=1)` on the [out, in] weight.
  """
  return jnp.sqrt(jnp.sum(jnp.square(w_IxO.astype(jnp.float32)), axis=-2))


def lora_delta(a_IxR, b_RxO, s: float):
  """s · A B in float32."""
  return s * jnp.matmul(a_IxR.astype(jnp.float32), b_RxO.astype(jnp.float32))


def randomized_svd(key, w_IxO, q: int, niter: int):
  """Top-q SVD by randomized subspace iteration (Halko, Martinsson, Tropp
  2011, Alg. 4.4; the scheme of torch.svd_lowrank that PEFT's
  `pissa_niter_k` uses). Returns (U [.., in, q], S [.., q], Vt [.., q, out]).
  """
  w = w_IxO.astype(jnp.float32)
  omega = jax.random.normal(key, (*w.shape[:-2], w.shape[-1], q), w.dtype)
  q_IxQ, _ = jnp.linalg.qr(jnp.matmul(w, omega))
  for _ in range(niter):  # Power iterations sharpen the spectrum's decay.
    z_OxQ, _ = jnp.linalg.qr(jnp.matmul(_t(w), q_IxQ))
    q_IxQ, _ = jnp.linalg.qr(jnp.matmul(w, z_OxQ))
  u_QxQ, s, vt = jnp.linalg.svd(jnp.matmul(_t(q_IxQ), w), full_matrices=False)
  return jnp.matmul(q_IxQ, u_QxQ), s, vt


def pissa(w_IxO, r: int, s: float, *, key=None, niter: int = 0):
  """PiSSA (Meng et al. 2024, arXiv 2404.02948; PEFT `pissa_init`).

  W = U S Vᵀ; A = U_r sqrt(S_r/s), B = sqrt(S_r/s) V_rᵀ, so s·A B is the
  rank-r principal part and the frozen base becomes the residual W − s·A B.
  `niter > 0` uses the randomized SVD with that many power iterations.
  Returns (A, B, residual) in float32.
  """
  w = _whole(w_IxO)
  if niter > 0:
    u, sv, vt = randomized_svd(key, w, r, niter)
  else:
    u, sv, vt = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(sv[..., :r] / s)
  a = u[..., :, :r] * root[..., None, :]
  b = root[..., :, None] * vt[..., :r, :]
  return a, b, w - lora_delta(a, b, s)


def olora(w_IxO, r: int, s: float):
  """OLoRA (Büyükakyüz 2024, arXiv 2406.01775; PEFT `olora_init`).

  QR of the PEFT-layout weight Wᵀ = Q R: B = Q_rᵀ, A = R_rᵀ (tunejax
  layout), residual base W − s·A B. Returns (A, B, residual) in float32.
  """
  w = _whole(w_IxO)
  q_OxK, r_KxI = jnp.linalg.qr(_t(w))
  a = _t(r_KxI[..., :r, :])
  b = _t(q_OxK[..., :, :r])
  return a, b, w - lora_delta(a, b, s)


def merges_forward(x, kernel_IxO) -> bool:
  """Whether `merged_linear` should run this LoRA product: float32 compute
  (the merged kernel holds a small s·A B to float32 rounding; in
  bf16 it would round away), at least as many rows as the kernel has inputs
  (training and prefill; a decode step keeps the rank-r path, cheaper than
  touching the whole kernel), on a CPU, where it was measured (2-core
  EPYC, W1 shapes, fwd+bwd with the adapter): down projection 81-86 -> 69-71
  ms, q 26-28 -> 24-25 ms, k/v 8.3-10.8 -> 7.7-8.1 ms, gate/up unchanged;
  W1's step 5.33 -> 5.04 s (best of 5, interleaved)."""
  rows = math.prod(x.shape[:-1])
  return (x.dtype == jnp.float32 and rows >= kernel_IxO.shape[-2]
          and jax.default_backend() == "cpu")


@jax.custom_vjp
def merged_linear(x, kernel_IxO, a_IxR, b_RxO, s):
  """LoRA's `x W + s·(x A) B` computed as `x (W + s·A B)`, with LoRA's
  gradients. All array operands in x's dtype; `s` a scalar array.

  The merged kernel replaces two rank-r products that write an
  output-sized activation (forward: (x A) B; backward: g Aᵀ) and their
  activation-sized adds; the backward keeps only the rank-r products the
  adapters' gradients need. Exact up to float32 rounding order.
  """
  return _merged_fwd(x, kernel_IxO, a_IxR, b_RxO, s)[0]


def _merged_fwd(x, kernel_IxO, a_IxR, b_RxO, s):
  w = kernel_IxO + (s * jnp.matmul(a_IxR, b_RxO)).astype(x.dtype)
  return seam.matmul(x, w), (x, w, a_IxR, b_RxO, s)


def _merged_bwd(res, dy):
  x, w_IxO, a_IxR, b_RxO, s = res
  x_NxI, dy_NxO = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dx = jnp.dot(dy_NxO, w_IxO.T).reshape(x.shape)
  # Barriers keep the rank-r activations [N, r]: XLA:CPU otherwise folds
  # the transposes of their uses into them and runs x A as [r, N], ~8x
  # slower; dA goes through `seam.xt_g` for the same reason.
  barrier = jax.lax.optimization_barrier
  g_NxR = barrier(jnp.dot(dy_NxO, b_RxO.T))
  xa_NxR = barrier(jnp.dot(x_NxI, a_IxR))
  da = seam.xt_g(x_NxI, g_NxR) * s
  db = jnp.dot(xa_NxR.T, dy_NxO) * s
  dw = seam.xt_g(x_NxI, dy_NxO)  # dead code unless the kernel trains
  return dx, dw, da, db, jnp.zeros_like(s)


merged_linear.defvjp(_merged_fwd, _merged_bwd)
