"""Mesh construction and logical-axis rules."""
import jax
import pytest
from jax.sharding import PartitionSpec as P

from tunejax import errors, sharding


def test_mesh_shape_resolves_rest():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(errors.ConfigError, match="need 16 devices"):
    sharding.mesh_shape({"data": 4, "fsdp": 2, "tensor": 2}, 8)
  with pytest.raises(errors.ConfigError, match="at most one"):
    sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_logical_to_spec_drops_indivisible_and_reused_axes():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.resolve_rules()
  assert sharding.logical_to_spec(("embed", "q_heads"), (64, 64), mesh,
                                  rules) == P("fsdp", "tensor")
  # One KV head of width 3: not divisible by 'tensor' -> replicated.
  assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh,
                                  rules) == P("fsdp", None)
  assert sharding.logical_to_spec(("act_batch", None), (8, 5), mesh,
                                  rules) == P(("data", "fsdp"), None)
  rules = sharding.resolve_rules({"vocab": ("tensor", "fsdp")})
  assert sharding.logical_to_spec(("vocab", "embed"), (16, 8), mesh,
                                  rules) == P(("tensor", "fsdp"), None)


def test_unknown_rule_name():
  with pytest.raises(errors.ConfigError, match="unknown logical axis"):
    sharding.resolve_rules({"embd": "fsdp"})


def test_constrain_is_identity_without_mesh_and_pins_with_one():
  x = jax.numpy.ones((8, 4))
  assert sharding.constrain(x, ("act_batch", None)) is x
  mesh = sharding.make_mesh({"data": 8})

  @jax.jit
  def f(x):
    with sharding.use_rules(mesh):
      return sharding.constrain(x * 2, ("act_batch", None))

  spec = f(x).sharding.spec
  assert tuple(spec)[:1] in (("data",), (("data",),))


def test_fsdp_fallback_spreads_large_unsharded_values():
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  rules = sharding.resolve_rules()
  # LoRA B [layers, rank, out]: 'rank' and the tensor-mapped out axis give
  # nothing on this mesh, so the fallback puts fsdp on the largest dim.
  spec = sharding.logical_to_spec(("layers", "rank", "mlp"), (4, 16, 4096),
                                  mesh, rules)
  assert sharding.fsdp_fallback(spec, (4, 16, 4096), mesh) == P(None, None,
                                                                "fsdp")
  small = sharding.logical_to_spec(("norm",), (64,), mesh, rules)
  assert sharding.fsdp_fallback(small, (64,), mesh) == small
  used = P("fsdp", None)
  assert sharding.fsdp_fallback(used, (4096, 4096), mesh) == used
