"""LoRA-Pro: corrected gradients vs an independent numpy float64 closed form
(scipy's Sylvester solver, the paper's layout), and training via config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from tunejax import data
from tunejax.peft import lora_pro
from tunejax.train import setup
from tests.train.helpers import random_batch, tiny_config

S = 2.0


def _numpy_lora_pro(a_ri, b_or, g_oi, s, x_mode):
  """Paper layout, float64: W = W0 + s·B A, G the full gradient."""
  ga, gb = s * b_or.T @ g_oi, s * g_oi @ a_ri.T
  r = a_ri.shape[0]
  aat, btb = a_ri @ a_ri.T, b_or.T @ b_or
  aat_inv = np.linalg.pinv(aat + 1e-8 * np.eye(r))
  btb_inv = np.linalg.pinv(btb + 1e-8 * np.eye(r))
  if x_mode == "sylvester":
    x = scipy.linalg.solve_sylvester(btb, aat,
                                     -btb_inv @ ga @ a_ri.T / s**2)
  elif x_mode == "symmetry":
    x = -0.5 / s**2 * btb_inv @ b_or.T @ gb @ aat
  else:
    x = np.zeros((r, r))
  proj = np.eye(b_or.shape[0]) - b_or @ btb_inv @ b_or.T
  return (btb_inv @ ga / s**2 + x @ a_ri,
          proj @ gb @ aat_inv / s**2 - b_or @ x)


def _problem(seed, d_in=12, d_out=10, r=3, lead=()):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(*lead, d_in, r)) / np.sqrt(d_in)   # tunejax A [in, r]
  b = rng.normal(size=(*lead, r, d_out)) / np.sqrt(r)     # tunejax B [r, out]
  g = rng.normal(size=(*lead, d_in, d_out))               # dL/dW [in, out]
  return a, b, g


@pytest.mark.parametrize("x_mode", lora_pro.X_MODES)
def test_corrected_grads_equal_float64_closed_form(x_mode):
  a, b, g = _problem(0)
  ga, gb = S * g @ b.T, S * a.T @ g  # LoRA grads in tunejax layout
  got_a, got_b = lora_pro.correct(*(jnp.asarray(z, jnp.float32)
                                    for z in (a, b, ga, gb)), S, x_mode)
  want_a, want_b = _numpy_lora_pro(a.T, b.T, g.T, S, x_mode)
  np.testing.assert_allclose(np.asarray(got_a), want_a.T, rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(got_b), want_b.T, rtol=1e-4,
                             atol=1e-5)
  # Theorem 2.1: the equivalent gradient is G projected on the tangent
  # space at BA, whatever X is: P_B G + (I − P_B) G P_A (paper layout).
  a_p, b_p, g_p = a.T, b.T, g.T
  p_b = b_p @ np.linalg.pinv(b_p)
  p_a = np.linalg.pinv(a_p) @ a_p
  equiv = S * (b_p @ np.asarray(got_a, np.float64).T +
               np.asarray(got_b, np.float64).T @ a_p)
  np.testing.assert_allclose(equiv, p_b @ g_p + (g_p - p_b @ g_p) @ p_a,
                             atol=2e-4)


def test_layer_stacked_and_zero_b():
  a, b, g = _problem(1, lead=(3,))
  b[1] = 0.0  # LoRA's init: B = 0 must stay finite (pinv of δI)
  ga, gb = S * g @ np.swapaxes(b, -1, -2), S * np.swapaxes(a, -1, -2) @ g
  got_a, got_b = lora_pro.correct(*(jnp.asarray(z, jnp.float32)
                                    for z in (a, b, ga, gb)), S)
  for i in range(3):
    want_a, want_b = _numpy_lora_pro(a[i].T, b[i].T, g[i].T, S, "sylvester")
    np.testing.assert_allclose(np.asarray(got_a[i]), want_a.T, rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_b[i]), want_b.T, rtol=1e-4,
                               atol=2e-5)


def test_transform_replaces_only_lora_pairs():
  a, b, g = _problem(2)
  params = {"m": {"lora_a": jnp.asarray(a, jnp.float32),
                  "lora_b": jnp.asarray(b, jnp.float32)},
            "other": jnp.ones(3)}
  grads = {"m": {"lora_a": jnp.asarray(S * g @ b.T, jnp.float32),
                 "lora_b": jnp.asarray(S * a.T @ g, jnp.float32)},
           "other": jnp.full(3, 0.5)}
  tx = lora_pro.lora_pro({"m": S}, "zero")
  out, _ = tx.update(grads, tx.init(params), params)
  want_a, want_b = lora_pro.correct(params["m"]["lora_a"],
                                    params["m"]["lora_b"],
                                    grads["m"]["lora_a"],
                                    grads["m"]["lora_b"], S, "zero")
  np.testing.assert_array_equal(np.asarray(out["m"]["lora_a"]), want_a)
  np.testing.assert_array_equal(np.asarray(out["m"]["lora_b"]), want_b)
  np.testing.assert_array_equal(np.asarray(out["other"]), 0.5)


def test_lora_pro_trains_through_optim_config():
  cfg = tiny_config(peft={"method": "lora", "rank": 4, "alpha": 8.0},
                    optim={"lr": 1e-2, "lora_pro": "sylvester"},
                    mesh={"data": 1})
  model_cfg, _ = setup.load_model(cfg.model)
  state, run = setup.build(cfg, model_cfg, None)
  step = setup.jit_train_step(run, 1)
  losses = []
  for i in range(5):
    b = data.to_global(random_batch(0), run.mesh, run.batch_sharding)
    state, m = step(state, b, jax.random.PRNGKey(0))
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05
