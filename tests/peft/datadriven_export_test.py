"""EVA and CorDA adapters export in PEFT's format: after a calibrated init
and some training, `peft.PeftModel.from_pretrained` on the transformers
model gives tunejax's logits (1e-4), and the import round-trips."""
import copy
import os

import jax
import numpy as np
import pytest

from tests.models.conftest import VOCAB, hf_logits
from tests.peft.common import make_method
from tests.peft.hf_peft_test import TOKENS, _logits
from tunejax import peft, tree

CALIB = np.random.RandomState(3).randint(3, VOCAB, (8, 16)).astype(np.int32)
TARGETS = r"layers/(attn/(q|v)|mlp/down)"


@pytest.mark.parametrize("method,extra", [("eva", {"eva_rho": 2.0}),
                                          ("corda", {"corda_mode": "ipm"})])
def test_calibrated_adapter_exports_to_peft(method, extra, hf_llama,
                                            tmp_path):
  import peft as hf_peft  # pylint: disable=import-outside-toplevel
  model, _, cfg, params = hf_llama
  m = make_method(method=method, rank=4, alpha=8.0, targets=(TARGETS,),
                  **extra)
  batch = {"tokens": CALIB, "segment_ids": np.ones_like(CALIB),
           "loss_mask": np.ones(CALIB.shape, np.float32)}
  ad, frozen = m.init(jax.random.PRNGKey(0), params,
                      m.collect_stats(cfg, params, [batch]))
  # "Training": move every adapter entry in use (EVA's padded rank slots,
  # zero columns of A, stay zero under gradient descent, and so here).
  flat = tree.flatten(ad)
  rng = np.random.RandomState(1)
  for n in sorted(flat):
    a = np.asarray(flat[n.rsplit("/", 1)[0] + "/lora_a"])
    used = (a != 0).any(axis=-2)  # [..., r]
    mask = used[..., None, :] if n.endswith("lora_a") else used[..., None]
    flat[n] = flat[n] + 0.05 * rng.normal(size=flat[n].shape) * mask
  ad = tree.unflatten(flat)
  out = str(tmp_path / method)
  assert m.export_adapter(ad, frozen, cfg, out)
  assert sorted(os.listdir(out)) == ["adapter_config.json",
                                     "adapter_model.safetensors"]
  pm = hf_peft.PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
  got = _logits(m, ad, frozen, cfg)
  assert np.abs(got - hf_logits(model, TOKENS)).max() > 1e-3
  np.testing.assert_allclose(got, hf_logits(pm, TOKENS), atol=1e-4, rtol=0)
  pcfg, ad2, frozen2 = peft.import_adapter(out, cfg, params)
  np.testing.assert_allclose(_logits(peft.get(pcfg), ad2, frozen2, cfg), got,
                             atol=1e-5, rtol=0)
