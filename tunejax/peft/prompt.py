"""The prompt family: soft prompt tuning, prefix tuning and DePT.

    soft prompt   model input [P; E(x)]                 P: [N, D] trained
    prefix        attention keys [K_l; K(x)], values [V_l; V(x)] per layer
    DePT          model input [P; E(x) + s·(A B)[pos]]  s = alpha / sqrt(r)

Soft prompt tuning (Lester et al. 2021, arXiv 2104.08691; PEFT
`tuners/prompt_tuning/model.py`): N virtual-token embeddings in the
embedding table's space (before any embedding scale: PEFT passes them as
`inputs_embeds`, which Gemma scales with the text). Init 'vocab' =
embeddings of uniformly random vocabulary ids (PEFT SAMPLE_VOCAB), 'text' =
embeddings of `prompt_init_ids` repeated / truncated to N (PEFT TEXT),
'random' = N(0, 1) (PEFT RANDOM, torch's Embedding init).

Prefix tuning (Li & Liang 2021, arXiv 2101.00190; P-tuning v2, Liu et al.
2022, arXiv 2110.07602; PEFT `tuners/prefix_tuning/model.py` and
`PeftModel.get_prompt`): per-layer key/value prefixes [n_layers, P, G, K]
that act as HF `past_key_values` (already rotated / normed keys). HF
derives positions from the cache length, so the text starts at position P
(`prefix_shift_positions`, default on). `prefix_projection` = H > 0 is
PEFT's reparametrisation: an embedding [P, D] -> Linear(D, H) -> tanh ->
Linear(H, n_layers·2·G·K), read in PEFT's layout (per virtual token:
layer, then key/value, then kv-head, then head dim). Inits follow torch's
defaults as PEFT does (Embedding N(0, 1); Linear U(±1/sqrt(fan_in))).

DePT (Shi & Lipani 2024, arXiv 2309.05173; official code
ZhengxiangShi/DePT, checked in reference/verified-formulas.md §14): a
shorter soft prompt plus a position-wise low-rank update of the frozen
input embeddings, E' = E + (alpha / sqrt(r)) · A B, A [max_len, r]
(torch kaiming-uniform: U(±1/sqrt(r))), B [r, D] zeros. The row of A is
the token's position in its document: the sequence index of the paper's
unpacked, padded inputs, and per document under packing. Positions >=
`dept_max_len` get no update. Two learning rates via `dept_lr_groups`.

Under packing every document sees the shared virtual tokens with the same
relative positions as when run alone (see `models/seam.py`).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tunejax import errors
from tunejax.models.seam import Seam, matmul
from tunejax.peft import peft_format, prompt_format
from tunejax.peft.base import Method, PeftConfig, register

_INITS = ("vocab", "text", "random")


@dataclasses.dataclass(frozen=True)
class PromptSeam(Seam):
  """Serves adapters['prompt'] (soft prompt, DePT) and adapters['prefix']."""
  dept_scale: float = 0.0
  shift_prefix: bool = True

  def prompt(self, x_BxLxD, positions_BxL, adapters):
    if "embedding" not in adapters:
      return x_BxLxD, None
    if "dept_a" in adapters:
      a, b = adapters["dept_a"], adapters["dept_b"]
      rows = jnp.take(a, jnp.clip(positions_BxL, 0, a.shape[0] - 1), axis=0)
      inside = (positions_BxL < a.shape[0])[..., None]
      delta = self.dept_scale * matmul(rows.astype(jnp.float32),
                                       b.astype(jnp.float32))
      x_BxLxD = (x_BxLxD + jnp.where(inside, delta, 0)).astype(x_BxLxD.dtype)
    return x_BxLxD, adapters["embedding"]

  def prefix(self, adapters):
    p = adapters.get("prefix")
    return None if p is None else (p["k"], p["v"])

  def position_offset(self, adapters):
    offset = 0
    if "embedding" in adapters.get("prompt", {}):
      offset += adapters["prompt"]["embedding"].shape[0]
    if self.shift_prefix and "prefix" in adapters:
      offset += adapters["prefix"]["k"].shape[1]
    return offset


def text_ids(cfg: PeftConfig, tokenizer) -> PeftConfig:
  """`cfg` with `prompt_init_ids` from `prompt_init_text` (encoded without
  BOS by the run's tokenizer) when only the text is given."""
  if not cfg.prompt_init_text or cfg.prompt_init_ids:
    return cfg
  return dataclasses.replace(
      cfg, prompt_init_ids=tuple(int(i) for i in tokenizer.encode(
          cfg.prompt_init_text)))


def init_prompt(cfg: PeftConfig, key, table_VxD, n: int) -> jax.Array:
  """[n, D] initial soft prompt (see the module docstring)."""
  vocab = table_VxD.shape[0]
  if cfg.prompt_init == "random":
    return jax.random.normal(key, (n, table_VxD.shape[1]), table_VxD.dtype)
  if cfg.prompt_init == "vocab":
    ids = jax.random.randint(key, (n,), 0, vocab)
  else:
    ids = list(cfg.prompt_init_ids)
    if not ids:
      raise errors.ConfigError(
          "config.peft.prompt_init='text' needs peft.prompt_init_text or "
          "peft.prompt_init_ids")
    if max(ids) >= vocab or min(ids) < 0:
      raise errors.ConfigError(
          f"config.peft.prompt_init_ids: ids must be in [0, {vocab})")
    ids = jnp.asarray((ids * math.ceil(n / len(ids)))[:n], jnp.int32)
  return jnp.take(table_VxD, ids, axis=0)


def _no_merge(name: str):
  raise errors.CheckpointError(
      f"config.peft.method '{name}': virtual tokens are inputs, not "
      "weights, so there is no merged checkpoint (export the adapter)")


class _Virtual(Method):
  """Methods that add virtual tokens: the base model is their reference,
  and they have no weight form to merge into."""
  trains_base_weights = False

  def reference(self, trainable, frozen):
    del trainable
    return frozen, None

  def merged(self, trainable, frozen):
    _no_merge(self.cfg.method)

  has_merged_form = False


@register("prompt")
class SoftPrompt(_Virtual):
  """Soft prompt tuning: trainable {'prompt': {'embedding': [N, D]}}."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.n_virtual < 1:
      raise errors.ConfigError("config.peft.n_virtual: must be >= 1")
    if cfg.prompt_init not in _INITS:
      raise errors.ConfigError(
          f"config.peft.prompt_init: '{cfg.prompt_init}' not in {_INITS}")

  seam = PromptSeam()

  def init(self, rng, params):
    table = params["embed"]["embedding"]
    emb = init_prompt(self.cfg, rng, table, self.cfg.n_virtual)
    return {"prompt": {"embedding": emb}}, params

  def assemble(self, trainable, frozen, rng=None):
    del rng
    return frozen, {"prompt": trainable["prompt"]}

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    del frozen
    peft_format.write_adapter(*prompt_format.prompt_tensors(
        trainable["prompt"]["embedding"], model_cfg), out_dir)
    return True

  def axes(self, model_axes):
    return {"prompt": {"embedding": (None, None)}}, model_axes


@register("dept")
class Dept(SoftPrompt):
  """DePT: soft prompt + position-wise low-rank embedding update."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.dept_rank < 1 or cfg.dept_max_len < 1:
      raise errors.ConfigError(
          "config.peft.dept_rank and dept_max_len: must be >= 1")

  @property
  def seam(self):
    return PromptSeam(dept_scale=self.cfg.dept_alpha /
                      math.sqrt(self.cfg.dept_rank))

  def init(self, rng, params):
    k_prompt, k_a = jax.random.split(rng)
    trainable, params = super().init(k_prompt, params)
    table = params["embed"]["embedding"]
    dtype, d = table.dtype, table.shape[1]
    r, bound = self.cfg.dept_rank, 1 / math.sqrt(self.cfg.dept_rank)
    trainable["prompt"]["dept_a"] = jax.random.uniform(
        k_a, (self.cfg.dept_max_len, r), dtype, -bound, bound)
    trainable["prompt"]["dept_b"] = jnp.zeros((r, d), dtype)
    return trainable, params

  def axes(self, model_axes):
    t_axes, f_axes = super().axes(model_axes)
    t_axes["prompt"].update(dept_a=(None, "rank"), dept_b=("rank", None))
    return t_axes, f_axes

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    """PEFT has no position-wise embedding update: no PEFT form."""
    del trainable, frozen, model_cfg, out_dir
    return False


def dept_lr_groups(lowrank_ratio: float) -> tuple[tuple[str, float], ...]:
  """DePT's two learning rates: `config.optim.lr` is the prompt's and A, B
  train at `lowrank_ratio` x it (paper: prompt 3e-1, low-rank 1e-4..5e-3).
  Append to `config.optim.lr_groups`."""
  return ((r"prompt/dept_(a|b)", float(lowrank_ratio)),)


@register("prefix")
class Prefix(_Virtual):
  """Prefix tuning: trainable {'prefix': {'k', 'v'}} [n_layers, P, G·K], or
  with `prefix_projection` the MLP ('embedding', 'w1', 'b1', 'w2', 'b2')
  that produces them."""

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if cfg.n_virtual < 1 or cfg.prefix_projection < 0:
      raise errors.ConfigError(
          "config.peft.n_virtual must be >= 1, prefix_projection >= 0")

  @property
  def seam(self):
    return PromptSeam(shift_prefix=self.cfg.prefix_shift_positions)

  def init(self, rng, params):
    n_layers, _, gk = params["layers"]["attn"]["k"]["kernel"].shape
    p, h = self.cfg.n_virtual, self.cfg.prefix_projection
    table = params["embed"]["embedding"]
    keys = jax.random.split(rng, 5)
    if not h:
      kv = jax.random.normal(keys[0], (2, n_layers, p, gk), table.dtype)
      return {"prefix": {"k": kv[0], "v": kv[1]}}, params
    d, out = table.shape[1], n_layers * 2 * gk
    unif = lambda key, shape, fan_in: jax.random.uniform(
        key, shape, table.dtype, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
    return {"prefix": {
        "embedding": jax.random.normal(keys[0], (p, d), table.dtype),
        "w1": unif(keys[1], (d, h), d), "b1": unif(keys[2], (h,), d),
        "w2": unif(keys[3], (h, out), h), "b2": unif(keys[4], (out,), h)}
           }, params

  def assemble(self, trainable, frozen, rng=None):
    del rng
    return frozen, {"prefix": prefix_kv(trainable["prefix"], frozen)}

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    """PEFT form only for text at positions P.. (HF's cache positions)."""
    if not self.cfg.prefix_shift_positions:
      return False
    kv = prefix_kv(trainable["prefix"], frozen)
    peft_format.write_adapter(*prompt_format.prefix_tensors(
        kv["k"], kv["v"], model_cfg, self.cfg.prefix_projection), out_dir)
    return True

  def axes(self, model_axes):
    if self.cfg.prefix_projection:
      names = {"embedding": 2, "w1": 2, "b1": 1, "w2": 2, "b2": 1}
    else:
      names = {"k": 3, "v": 3}
    return {"prefix": {k: (None,) * n for k, n in names.items()}}, model_axes


def prefix_kv(prefix: dict, params: dict) -> dict:
  """{'k', 'v'} [n_layers, P, G·K] from the trainable prefix tree."""
  if "k" in prefix:
    return prefix
  n_layers, _, gk = params["layers"]["attn"]["k"]["kernel"].shape
  f32 = lambda k: prefix[k].astype(jnp.float32)
  hid = jnp.tanh(f32("embedding") @ f32("w1") + f32("b1"))
  flat = (hid @ f32("w2") + f32("b2")).astype(prefix["w2"].dtype)
  kv = flat.reshape(-1, n_layers, 2, gk).transpose(2, 1, 0, 3)  # PEFT layout
  return {"k": kv[0], "v": kv[1]}
