"""LoFiT's two phases as one run (configs/lofit.py) on the tiny model:
phase 1 selects the top-K heads by ||A_h|| (checked against numpy on the
phase-1 checkpoint), phase 2 trains only those heads' biases from the base,
and the export is the tunejax adapter next to the unchanged base."""
import dataclasses
import importlib.util
import os

import jax
import numpy as np
import pytest

from tunejax import models, train, tree
from tunejax.peft import peft_format
from tunejax.train import config as tcfg, metrics as metrics_lib, tasks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
K = 3


def _recipe(**over) -> tcfg.Config:
  path = os.path.join(ROOT, "configs", "lofit.py")
  spec = importlib.util.spec_from_file_location("lofit_cfg", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(f"steps=3,phase1_steps=4,k={K}")
  c.data.seq_len = 16
  c.optim.lr = 5e-2  # Big enough that 4 steps rank the heads clearly.
  c.checkpoint.async_save = False
  c.checkpoint.export_at_end = True
  c.eval.every = -1
  c.log.tensorboard = False
  c.log.every = 1
  c.update_from_flattened_dict(over)
  return tcfg.from_configdict(c)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("lofit"))
  cfg = _recipe()
  return cfg, wd, train.run(cfg, wd)


@pytest.fixture(scope="module")
def phase1(recipe):
  """Phase 1's final state, restored from its own checkpoint."""
  cfg, wd, out = recipe
  cfg1 = dataclasses.replace(cfg, total_steps=cfg.peft.lofit_phase1_steps)
  state, _ = tasks._restored_state(  # pylint: disable=protected-access
      cfg1, os.path.join(wd, "lofit_phase1"), out["run"].model_cfg, None)
  return jax.device_get(state)


def test_both_phases_ran(recipe):
  cfg, wd, _ = recipe
  steps = lambda d: [r["step"] for r in metrics_lib.read(d) if "loss" in r]
  assert steps(os.path.join(wd, "lofit_phase1")) == [1, 2, 3, 4]
  assert steps(wd) == [1, 2, 3]
  assert all("lofit_l1" in r for r in metrics_lib.read(
      os.path.join(wd, "lofit_phase1")) if "loss" in r)
  assert cfg.total_steps == 3


def test_phase2_heads_are_phase1_top_k(recipe, phase1):
  _, _, out = recipe
  mcfg = out["run"].model_cfg
  a = np.asarray(phase1.params["layers"]["attn"]["heads"]["lofit_scale"],
                 np.float64)
  assert np.abs(a).max() > 1e-2  # Phase 1 trained A away from its init.
  norms = np.linalg.norm(a.reshape(-1, mcfg.head_dim), axis=-1)
  want = np.sort(np.argsort(-norms)[:K])
  pcfg = out["run"].method.cfg
  assert pcfg.lofit_phase == 2 and pcfg.lofit_heads == tuple(want)
  assert pcfg.lofit_head_dim == mcfg.head_dim


def test_phase2_trains_only_selected_biases_from_the_base(recipe, phase1):
  _, _, out = recipe
  state, mcfg = jax.device_get(out["state"]), out["run"].model_cfg
  assert list(tree.flatten(state.params)) == ["lofit/bias"]
  bias = np.asarray(state.params["lofit"]["bias"])
  assert bias.shape == (K, mcfg.head_dim)
  assert np.abs(bias).max() > 1e-2  # trained away from N(0, 1e-3²)
  # The base is untouched and the same as phase 1's (A discarded).
  jax.tree.map(np.testing.assert_array_equal, state.frozen, phase1.frozen)
  # Heads outside the selection get exactly zero bias.
  _, ad = out["run"].method.assemble(state.params, state.frozen)
  full = np.asarray(ad["layers"]["attn"]["heads"]["lofit_bias"]).reshape(
      -1, mcfg.head_dim)
  off = np.setdiff1d(np.arange(full.shape[0]),
                     out["run"].method.cfg.lofit_heads)
  assert np.all(full[off] == 0)


def test_export_is_adapter_and_base(recipe):
  _, wd, out = recipe
  root = os.path.join(wd, "export")
  assert sorted(os.listdir(root)) == ["adapter_tunejax", "hf"]
  assert out["export"] == os.path.join(root, "adapter_tunejax")
  pcfg, t = peft_format.import_native(out["export"])
  state = jax.device_get(out["state"])
  assert pcfg == out["run"].method.cfg
  np.testing.assert_array_equal(t["lofit"]["bias"],
                                state.params["lofit"]["bias"])
  _, base = models.load(os.path.join(root, "hf"))
  for k, x in tree.flatten(base).items():
    np.testing.assert_array_equal(x, tree.flatten(state.frozen)[k])


def test_export_task_rebuilds_phase2_from_checkpoints(recipe, tmp_path):
  cfg, wd, out = recipe
  again = train.run(dataclasses.replace(cfg, task="export"), wd)
  pcfg, t = peft_format.import_native(again["export"])
  assert pcfg.lofit_heads == out["run"].method.cfg.lofit_heads
  np.testing.assert_array_equal(
      t["lofit"]["bias"], jax.device_get(out["state"].params["lofit"]["bias"]))
  with pytest.raises(Exception, match="lofit_phase1_steps"):
    train.run(dataclasses.replace(cfg, task="export"), str(tmp_path))
