"""Prompt-family exports: PEFT-format adapters for soft prompts, prefixes
and (IA)^3 load in HF `peft` (torch) with tunejax's logits; import round
trips; methods PEFT cannot represent export tunejax's own adapter; and
`tasks.export` writes what each method has (never a merged checkpoint for
virtual tokens)."""
import copy
import functools
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models.conftest import VOCAB, hf_logits
from tests.peft.common import make_method
from tunejax import errors, models, peft, tree
from tunejax.models.seam import Seam
from tunejax.peft import peft_format
from tunejax.train import tasks
from tunejax.train.config import ModelSection

torch = pytest.importorskip("torch")
hf_peft = pytest.importorskip("peft")

TOL = 1e-4
TOKENS = np.random.RandomState(0).randint(3, VOCAB, (2, 9))
CASES = {
    "prompt": dict(method="prompt", n_virtual=4),
    "prefix": dict(method="prefix", n_virtual=3),
    "prefix_mlp": dict(method="prefix", n_virtual=3, prefix_projection=8),
    "ia3": dict(method="ia3"),
}


def _trained(method, params, seed):
  """Init, then move every trainable leaf as training would."""
  t, f = method.init(jax.random.PRNGKey(seed), params)
  flat = tree.flatten(t)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(flat))
  t = tree.unflatten({n: x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                      for (n, x), k in zip(sorted(flat.items()), keys)})
  return jax.device_get(t), f


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(cfg, seam, base, adapters):
  return models.forward(cfg, base, jnp.asarray(TOKENS), adapters=adapters,
                        seam=seam)


def _logits(method, t, f, cfg):
  base, ad = method.assemble(t, f)
  return np.asarray(_forward(cfg, method.seam, base, ad))


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, hf_llama, tmp_path_factory):
  _, _, cfg, params = hf_llama
  m = make_method(**CASES[request.param])
  t, f = _trained(m, params, seed=sorted(CASES).index(request.param))
  out = str(tmp_path_factory.mktemp("adapter") / request.param)
  assert m.export_adapter(t, f, cfg, out)
  return request.param, m, t, f, out


def test_peft_loads_export_and_matches(exported, hf_llama):
  name, m, t, f, out = exported
  model, _, cfg, _ = hf_llama
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]
  assert not m.has_merged_form or name == "ia3"
  pm = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
  # PEFT returns logits for the soft prompt's virtual tokens too.
  skip = CASES[name]["n_virtual"] if name == "prompt" else 0
  ref = hf_logits(pm, TOKENS, np.ones_like(TOKENS))[:, skip:]
  got = _logits(m, t, f, cfg)
  assert np.abs(got - hf_logits(model, TOKENS)).max() > 1e-2  # not a no-op
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)


def test_import_round_trips(exported, hf_llama):
  name, m, t, f, out = exported
  _, _, cfg, params = hf_llama
  pcfg, t2, f2 = peft.import_adapter(out, cfg, params)
  assert pcfg.method == CASES[name]["method"]
  m2 = peft.get(pcfg)
  if name != "prefix_mlp":  # The MLP comes back as the k/v it produces.
    jax.tree.map(np.testing.assert_array_equal, t2, t)
  np.testing.assert_allclose(_logits(m2, t2, f2, cfg), _logits(m, t, f, cfg),
                             atol=1e-6, rtol=0)
  if name == "ia3":  # And the weight form agrees with the adapter form.
    merged = m2.merged(t2, f2)
    np.testing.assert_allclose(
        np.asarray(_forward(cfg, Seam(), merged, None)),
        _logits(m, t, f, cfg), atol=1e-5, rtol=0)


NO_PEFT_FORM = {
    "dept": dict(method="dept", n_virtual=3, dept_rank=2, dept_max_len=16),
    "ia3_after_rope": dict(method="ia3", ia3_k_after_rope=True),
    "prefix_unshifted": dict(method="prefix", n_virtual=2,
                             prefix_shift_positions=False),
    "lofit2": dict(method="lofit", lofit_phase=2, lofit_heads=(1, 6),
                   lofit_head_dim=16),
}


@pytest.mark.parametrize("name", sorted(NO_PEFT_FORM))
def test_native_adapter_round_trips(name, hf_llama, tmp_path):
  _, _, cfg, params = hf_llama
  m = make_method(**NO_PEFT_FORM[name])
  t, f = _trained(m, params, seed=7)
  assert not m.export_adapter(t, f, cfg, str(tmp_path / "peft"))
  assert not os.path.exists(tmp_path / "peft")
  assert not m.has_merged_form
  with pytest.raises(errors.CheckpointError):
    m.merged(t, f)
  peft_format.export_native(m.cfg, t, str(tmp_path / "native"))
  pcfg, t2 = peft_format.import_native(str(tmp_path / "native"))
  assert pcfg == m.cfg
  jax.tree.map(np.testing.assert_array_equal, t2, t)
  m2 = peft.get(pcfg)
  np.testing.assert_array_equal(_logits(m2, t2, params, cfg),
                                _logits(m, t, f, cfg))


def _export(tmp_path, method, t, f, model_cfg, model_name):
  """tasks.export on a hand-built state (no training needed)."""
  cfg = types.SimpleNamespace(model=ModelSection(name=model_name))
  state = types.SimpleNamespace(params=t, frozen=f)
  run = types.SimpleNamespace(method=method, model_cfg=model_cfg)
  main = tasks.export(cfg, str(tmp_path), state, run)
  return main, sorted(os.listdir(tmp_path / "export"))


def test_task_export_prompt_next_to_hf_base(hf_llama, tmp_path):
  """Base on disk already: only the PEFT adapter is written."""
  _, path, cfg, params = hf_llama
  m = make_method(**CASES["prompt"])
  t, f = _trained(m, params, seed=0)
  main, files = _export(tmp_path, m, t, f, cfg, path)
  assert files == ["adapter"] and main == str(tmp_path / "export/adapter")
  with open(os.path.join(main, "adapter_config.json")) as fh:
    assert json.load(fh)["peft_type"] == "PROMPT_TUNING"


def test_task_export_dept_writes_base_and_native(hf_llama, tmp_path):
  """Base from a preset-like source: the unchanged base is written too."""
  _, _, cfg, params = hf_llama
  m = make_method(**NO_PEFT_FORM["dept"])
  t, f = _trained(m, params, seed=3)
  main, files = _export(tmp_path, m, t, f, cfg, "tiny")
  assert files == ["adapter_tunejax", "hf"]
  assert main == str(tmp_path / "export/adapter_tunejax")
  _, base = models.load(str(tmp_path / "export/hf"))
  jax.tree.map(np.testing.assert_array_equal, tree.flatten(base),
               tree.flatten(jax.device_get(params)))


def test_task_export_ia3_merges(hf_llama, tmp_path):
  """A method with a weight form keeps writing the merged checkpoint (and
  its PEFT adapter)."""
  _, path, cfg, params = hf_llama
  m = make_method(**CASES["ia3"])
  t, f = _trained(m, params, seed=4)
  main, files = _export(tmp_path, m, t, f, cfg, path)
  assert files == ["adapter", "hf"] and main == str(tmp_path / "export/hf")
  _, merged = models.load(main)
  want = tree.flatten(jax.device_get(m.merged(t, f)))
  for k, x in tree.flatten(merged).items():
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want[k]))
