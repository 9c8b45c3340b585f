"""Parameter names and first-match regex rules."""
import jax.numpy as jnp
import pytest

from tunejax import errors, tree

P = {"layers": {"attn": {"q": {"kernel": jnp.ones((2, 3))}},
                "mlp_norm": {"scale": jnp.ones(3)}},
     "embed": {"embedding": jnp.ones((5, 3))}}


def test_flatten_roundtrip_and_names():
  flat = tree.flatten(P)
  assert set(flat) == {"layers/attn/q/kernel", "layers/mlp_norm/scale",
                       "embed/embedding"}
  assert tree.flatten(tree.unflatten(flat)).keys() == flat.keys()


def test_first_match_wins_and_coverage():
  labels = tree.label_tree(P, [(r".*norm.*", "freeze"), (r".*", "train")])
  assert tree.flatten(labels) == {"layers/attn/q/kernel": "train",
                                  "layers/mlp_norm/scale": "freeze",
                                  "embed/embedding": "train"}
  with pytest.raises(errors.ConfigError, match="matched by no rule"):
    tree.label_tree(P, [(r"layers/.*", "x")])
  with pytest.raises(errors.ConfigError, match="matches no parameter"):
    tree.label_tree(P, [(r"nothing", "x"), (r".*", "y")])
  with pytest.raises(errors.ConfigError, match="bad regex"):
    tree.label_tree(P, [(r"(", "x")])


def test_split_merge_and_nbytes():
  a, b = tree.split(P, lambda n: n.startswith("layers/"))
  assert set(tree.flatten(a)) == {"layers/attn/q/kernel",
                                  "layers/mlp_norm/scale"}
  assert tree.flatten(tree.merge(a, b)).keys() == tree.flatten(P).keys()
  assert tree.nbytes(P) == 4 * (6 + 3 + 15)
  with pytest.raises(ValueError):
    tree.merge(a, a)
