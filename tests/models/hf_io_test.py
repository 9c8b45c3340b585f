"""Checkpoint I/O errors and sharded loading."""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tunejax import errors, sharding
from tunejax import models
from tunejax.models import safetensors_io


@pytest.fixture
def ckpt(hf_models, tmp_path):
  """A fresh copy of the tiny llama checkpoint to damage."""
  path = str(tmp_path / "ckpt")
  shutil.copytree(hf_models["llama"][1], path)
  return path


def _edit_config(path, **changes):
  with open(os.path.join(path, "config.json")) as f:
    d = json.load(f)
  d.update(changes)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(d, f)


def _edit_tensors(path, fn):
  file = os.path.join(path, "model.safetensors")
  st = safetensors_io.SafetensorsFile(file)
  tensors = {k: np.array(st.get(k)) for k in st.keys()}
  del st
  safetensors_io.write(file, fn(tensors))


def test_unknown_model_type(ckpt):
  _edit_config(ckpt, model_type="gpt2")
  with pytest.raises(errors.ModelError, match=r"config\.json.*'gpt2'"):
    models.load(ckpt)


def test_unsupported_field(ckpt):
  _edit_config(ckpt, mlp_bias=True)
  with pytest.raises(errors.ModelError, match=r"config\.json.*'mlp_bias'"):
    models.load(ckpt)
  _edit_config(ckpt, mlp_bias=False, rope_parameters={"rope_type": "yarn",
                                                      "factor": 2.0})
  with pytest.raises(errors.ModelError, match="yarn"):
    models.load(ckpt)


def test_missing_tensor(ckpt):
  name = "model.layers.1.mlp.up_proj.weight"
  _edit_tensors(ckpt, lambda t: {k: v for k, v in t.items() if k != name})
  with pytest.raises(errors.ModelError, match=f"missing tensor '{name}'"):
    models.load(ckpt)


def test_wrong_shape(ckpt):
  name = "model.layers.0.self_attn.k_proj.weight"
  _edit_tensors(ckpt, lambda t: {**t, name: t[name][:-1]})
  with pytest.raises(errors.ModelError,
                     match=rf"model\.safetensors: tensor '{name}' has shape"):
    models.load(ckpt)


def test_truncated_file(ckpt):
  file = os.path.join(ckpt, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 100)
  with pytest.raises(errors.ModelError,
                     match=r"model\.safetensors: truncated file, tensor '"):
    models.load(ckpt)
  with open(file, "r+b") as f:
    f.truncate(20)
  with pytest.raises(errors.ModelError, match=r"model\.safetensors: not a"):
    models.load(ckpt)


def test_not_a_checkpoint(tmp_path):
  with pytest.raises(errors.ModelError, match="not a checkpoint directory"):
    models.load(str(tmp_path / "nothing"))
  with pytest.raises(errors.ModelError, match=r"config\.json: file not found"):
    models.load(str(tmp_path))


def test_load_with_shardings_places_shards(hf_models, loaded):
  cfg, params = loaded["gemma3"]
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings = sharding.tree_shardings(models.param_axes(cfg), params, mesh,
                                      sharding.resolve_rules())
  cfg2, placed = models.load(hf_models["gemma3"][1], shardings=shardings)
  assert cfg2 == cfg
  for a, b, s in zip(jax.tree.leaves(params), jax.tree.leaves(placed),
                     jax.tree.leaves(shardings)):
    assert b.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  q = placed["layers"]["attn"]["q"]["kernel"]
  # fsdp x tensor split: each device holds a quarter of the q kernel.
  assert q.addressable_shards[0].data.shape == (6, 32, 32)
