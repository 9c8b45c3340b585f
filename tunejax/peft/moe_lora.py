"""MoE-LoRA (MixLoRA): E LoRA experts in the FFN behind a top-k router.

Li et al. 2024, "MixLoRA: Enhancing Large Language Models Fine-Tuning with
LoRA based Mixture of Experts" (arXiv 2404.15159), as in the official code
(TUDB-Labs/MixLoRA; see reference/verified-formulas.md §18a):

    expert_e(x) = W_down^e( act(W_gate^e x) ⊙ W_up^e x ),  W^e = W + s·A_e B_e
    p = softmax(x R),  top-k of p renormalised to w,  y = Σ_{e∈topk} w_e expert_e(x)
    L_aux = coef · E · Σ_e f_e · P_e     (Switch / Mixtral form)

The experts share the frozen W_gate, W_up, W_down; R [D, E] is a bias-free
router (init N(0, 0.02²)). f_e is the fraction of (layer, token) pairs that
have e among their top-k (Σ_e f_e = k) and P_e the mean router probability,
both over all layers' non-padding tokens. Attention modules matching
`peft.targets` get plain LoRA, configured as for 'lora'.

Through the unchanged model seam: the gate and up linears return all E
experts side by side, [..., E·F], and the up output is already multiplied by
the routing weight w_e (zero off the top-k). The model's elementwise
`act(gate) * up` then forms every expert's hidden w_e·(act(g_e) ⊙ u_e), and
because W_down^e is linear, the down linear's Σ_e W_down^e(hidden_e) is
exactly Σ_e w_e expert_e(x). Experts run densely (every token through all
E, the non-selected ones weighted 0): simple and exact, but E× the FFN
adapter cost; sparse token dispatch is not implemented. The router's
per-token probabilities and top-k mask leave the seam as side outputs
('mlp/up/router_probs', 'mlp/up/router_topk') for `aux_loss`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tunejax import errors, sharding, tree
from tunejax.models.seam import matmul
from tunejax.peft import lora, lowrank
from tunejax.peft.base import PeftConfig, register

FFN = ("layers/mlp/gate", "layers/mlp/up", "layers/mlp/down")
ROUTER_STD = 0.02


def route(logits_xE, k: int):
  """(probs, top-k weights renormalised to 1, top-k 0/1 mask), float32."""
  probs = jax.nn.softmax(logits_xE.astype(jnp.float32), axis=-1)
  top, idx = jax.lax.top_k(probs, k)
  hot = jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32)  # [.., k, E]
  weights = jnp.einsum("...k,...ke->...e", top / jnp.sum(top, -1,
                                                         keepdims=True), hot)
  return probs, weights, jnp.sum(hot, axis=-2)


def balance_loss(probs_xE, topk_xE, mask_x):
  """E · Σ_e f_e P_e over the positions where `mask` is 1 (any leading
  shape, e.g. [layers, B, L]); f_e: top-k membership rate, P_e: mean
  probability."""
  m = mask_x.astype(jnp.float32)[..., None]
  n = jnp.maximum(jnp.sum(m), 1.0)
  f = jnp.sum(topk_xE * m, axis=tuple(range(m.ndim - 1))) / n
  p = jnp.sum(probs_xE * m, axis=tuple(range(m.ndim - 1))) / n
  return probs_xE.shape[-1] * jnp.sum(f * p)


@dataclasses.dataclass(frozen=True)
class MoeLoraSeam(lora.LoraSeam):
  """LoRA seam plus expert LoRAs (`moe_a` [E, in, r], `moe_b` [E, r, out])
  on the FFN linears; the up linear's adapters hold the `router`."""
  top_k: int = 2

  def linear(self, name, x, kernel, bias, adapters):
    if "moe_a" not in adapters:
      return super().linear(name, x, kernel, bias, adapters)
    s = dict(self.scales)[name]
    a, b = (adapters[k].astype(x.dtype) for k in ("moe_a", "moe_b"))
    n_exp = a.shape[0]
    w = kernel.astype(x.dtype)
    if name.endswith("/down"):  # x: [..., E·F], the experts' hiddens
      xe = x.reshape(*x.shape[:-1], n_exp, -1)
      xd = self._drop(xe, adapters)
      # s scales the rank-r products (smaller than the outputs).
      y = matmul(jnp.sum(xe, axis=-2), w) + jnp.einsum(
          "...er,ero->...o", s * jnp.einsum("...ef,efr->...er", xd, a), b)
      return y if bias is None else y + bias.astype(x.dtype)
    xd = self._drop(x, adapters)
    y = matmul(x, w)
    if bias is not None:
      y = y + bias.astype(x.dtype)
    ye = y[..., None, :] + jnp.einsum(
        "...er,erf->...ef", s * jnp.einsum("...d,edr->...er", xd, a), b)
    side = {}
    if "router" in adapters:  # the up linear: weight each expert here
      probs, weights, topk = route(matmul(x, adapters["router"].astype(
          x.dtype)), self.top_k)
      ye = ye * weights.astype(x.dtype)[..., None]
      side = {"router_probs": probs, "router_topk": topk}
    ye = ye.reshape(*ye.shape[:-2], -1)
    return (ye, side) if side else ye

  def _drop(self, x, adapters):
    if "dropout_key" in adapters and self.dropout > 0:
      return lora._dropout(x, adapters["dropout_key"], self.dropout)  # pylint: disable=protected-access
    return x


@register("moe_lora")
class MoeLora(lora.Lora):
  """MixLoRA experts on the FFN; plain LoRA on the other `peft.targets`."""
  wants_model_aux = True

  def __init__(self, cfg: PeftConfig):
    super().__init__(cfg)
    if not 1 <= cfg.moe_top_k <= cfg.moe_experts:
      raise errors.ConfigError(
          "config.peft.moe_top_k: must be in [1, peft.moe_experts]")

  def targets(self, params):
    """Plain-LoRA targets: `peft.targets` minus the FFN (experts there)."""
    return {m: ra for m, ra in super().targets(params).items()
            if m not in FFN}

  @property
  def seam(self):
    return MoeLoraSeam(tuple(sorted(self._scales.items())), self.cfg.dropout,
                       self.cfg.moe_top_k)

  def _experts(self, key, w, r: int, router: bool) -> dict:
    """E LoRA pairs (A Kaiming-uniform, B zero) and maybe the router."""
    *lead, d_in, d_out = w.shape
    e = self.cfg.moe_experts
    k_a, k_r = jax.random.split(key)
    ad = {"moe_a": lowrank.kaiming_a(k_a, d_in, r, (*lead, e), w.dtype),
          "moe_b": jnp.zeros((*lead, e, r, d_out), w.dtype)}
    if router:
      ad["router"] = (ROUTER_STD * jax.random.normal(
          k_r, (*lead, d_in, e), jnp.float32)).astype(w.dtype)
    return ad

  def init(self, rng, params):
    adapters, frozen = super().init(rng, params)
    flat_p, flat_a = tree.flatten(params), tree.flatten(adapters)
    for i, m in enumerate(FFN):
      r, alpha = self._rank_alpha(m)
      self._scales[m] = self.scale(r, alpha)
      ad = self._experts(jax.random.fold_in(rng, (1 << 21) + i),
                         flat_p[m + "/kernel"], r, m == "layers/mlp/up")
      flat_a.update({f"{m}/{k}": v for k, v in ad.items()})
    return tree.unflatten(flat_a), frozen

  def lora_scales(self):  # LoRA-Pro applies to the plain pairs only
    return {m: s for m, s in self._scales.items() if m not in FFN}

  def axes(self, model_axes):
    t_axes, f_axes = super().axes(model_axes)
    flat = tree.flatten(t_axes, tree.is_axes)
    m_axes = tree.flatten(model_axes, tree.is_axes)
    for m in FFN:
      *lead, ax_in, ax_out = m_axes[m + "/kernel"]
      flat[m + "/moe_a"] = (*lead, sharding.EXPERTS, ax_in, sharding.RANK)
      flat[m + "/moe_b"] = (*lead, sharding.EXPERTS, sharding.RANK, ax_out)
      if m == "layers/mlp/up":
        flat[m + "/router"] = (*lead, ax_in, sharding.EXPERTS)
    return tree.unflatten(flat), f_axes

  def aux_loss(self, side, segment_ids_BxL):
    probs = side["mlp/up/router_probs"]  # [n_layers, B, L, E]
    mask = jnp.broadcast_to(segment_ids_BxL > 0, probs.shape[:-1])
    bal = balance_loss(probs, side["mlp/up/router_topk"], mask)
    return self.cfg.moe_aux_coef * bal, {"moe_balance": bal}

  def merged(self, trainable, frozen):
    raise errors.ConfigError(
        "peft 'moe_lora': a routed mixture of experts has no single merged "
        "kernel; export the adapters instead")

  def export_adapter(self, trainable, frozen, model_cfg, out_dir):
    del trainable, frozen, model_cfg, out_dir
    return False
