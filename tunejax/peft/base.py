"""The PEFT method interface, its registry, and the non-adapter methods."""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

from tunejax import errors, tree
from tunejax.models.seam import Seam


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  # none (full FT) | freeze | lora | rslora | dora | pissa | olora | vera
  method: str = "none"
  # 'freeze': regexes over param names that stay trainable (others frozen).
  trainable: tuple[str, ...] = (".*",)
  # LoRA family.
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = (r"layers/(attn/(q|k|v|o)|mlp/(gate|up|down))",)
  # (regex, rank, alpha) per-target overrides; first match wins.
  overrides: tuple[tuple[str, int, float], ...] = ()
  rslora: bool = False  # s = alpha / sqrt(r) for any LoRA-family method
  svd_niter: int = 0  # PiSSA: 0 = exact SVD, k > 0 = randomized, k iters
  vera_d_init: float = 0.1  # VeRA: initial lambda_d
  # Params trained alongside the adapters (regexes over param names), e.g.
  # LongLoRA's (r"embed/embedding", r".*norm/scale").
  also_trainable: tuple[str, ...] = ()
  # QLoRA ('qlora'): frozen layer kernels stored 'nf4' | 'int8', block-wise
  # absmax; double quantisation of the absmax constants (8-bit, block 256).
  quant: str = "nf4"
  quant_block: int = 64
  quant_double: bool = True
  # MoE-LoRA ('moe_lora', MixLoRA): experts on the FFN, top-k router,
  # load-balance loss weight.
  moe_experts: int = 8
  moe_top_k: int = 2
  moe_aux_coef: float = 0.01
  # Sparse deltas ('sparse', 'spiel', 'lt_sft'; see peft/sparse.py) on the
  # kernels of `targets`. Budget per matrix (per layer): sparse_k, else
  # sparse_match_rank·(in + out) (LoRA-r parameter count; -1: r = `rank`),
  # else density.
  sparse_mask: str = "random"  # random | magnitude | lift | fisher | lt_sft
  sparse_k: int = 0
  sparse_match_rank: int = 0
  sparse_density: float = 0.01
  sparse_batches: int = 4  # batches for Fisher / SpIEL gradient statistics
  lift_rank: int = 32  # LIFT: rank f of the low-rank approximation
  lift_every: int = 0  # LIFT: re-select the mask every N steps (0 = never)
  spiel_every: int = 20  # SpIEL: drop/grow every R steps
  spiel_rate: float = 0.2  # SpIEL: initial drop fraction p
  spiel_schedule: str = "linear"  # linear | cosine decay of p to 0
  spiel_first_full: bool = True  # p = 1 at the first drop/grow (paper)
  lt_sft_steps: int = 100  # LT-SFT: phase-1 full fine-tuning steps
  # LT-SFT global ranking: one top-K over all matrices (K = the summed
  # per-matrix budgets); each matrix holds at most slack x its budget.
  lt_sft_global: bool = False
  lt_sft_slack: float = 2.0
  hft_every: int = 0  # Half Fine-Tuning: steps per round (0 = one round)
  hft_seed: int = 0
  # Data-driven inits ('eva', 'corda'; see peft/datadriven.py): statistics
  # of the targets' inputs over the first `calib_batches` training batches,
  # read by `on_start`; `calib_label_mask`: loss tokens only (PEFT's EVA
  # `use_label_mask`).
  calib_batches: int = 4
  calib_label_mask: bool = True
  eva_rho: float = 2.0  # EVA: max rank per matrix = round(rho · r)
  eva_whiten: bool = False  # EVA: A columns / sqrt(singular value)
  corda_mode: str = "ipm"  # CorDA: ipm (adapt largest) | kpm (smallest)
  # KaSA ('kasa'): beta·||d||² + gamma·(orthogonality) added to the loss;
  # kasa_orth 'rank' = r x r Grams (paper, PEFT) | 'full' = in x in and
  # out x out (official code); kasa_reduce over adapted matrices: 'mean'
  # (official code) | 'sum' (PEFT `_get_kasa_loss`).
  kasa_beta: float = 1e-4
  kasa_gamma: float = 1e-3
  kasa_orth: str = "rank"
  kasa_reduce: str = "mean"
  # NLoRA ('nlora', 'slora', 'inttune'): B·M·A init 'nystrom' (M =
  # pinv(W_rr)/s, so s·A M B is W's Nyström approximation) | 'code' (the
  # official code: M = W_rr); nlora_residual: frozen base W − s·A M B.
  nlora_init: str = "nystrom"
  nlora_residual: bool = True
  # Prompt family (peft/prompt.py): 'prompt' (soft prompt), 'prefix',
  # 'dept'. n_virtual: soft-prompt tokens / prefix length P.
  n_virtual: int = 20
  # Soft prompt / DePT init: 'vocab' (embeddings of random token ids) |
  # 'text' (prompt_init_ids, from prompt_init_text tokenized by the run's
  # tokenizer, repeated/truncated to n_virtual) | 'random' (N(0, 1), PEFT).
  prompt_init: str = "vocab"
  prompt_init_text: str = ""
  prompt_init_ids: tuple[int, ...] = ()
  prefix_projection: int = 0  # prefix: MLP hidden size (0 = direct k/v)
  prefix_shift_positions: bool = True  # text at positions P.. (HF/PEFT)
  dept_rank: int = 8  # DePT: A [dept_max_len, r] · B [r, D], s = a/sqrt(r)
  dept_alpha: float = 8.0
  dept_max_len: int = 256  # positions >= this get no embedding update
  # (IA)^3 ('ia3', peft/ia3.py): output scaling of ia3_targets, input
  # scaling of ia3_feedforward (PEFT); ia3_k_after_rope: scale the keys
  # after RoPE / k-norm instead (the paper's l_k ⊙ K; not foldable).
  ia3_targets: tuple[str, ...] = (r"layers/attn/(k|v)", r"layers/mlp/down")
  ia3_feedforward: tuple[str, ...] = (r"layers/mlp/down",)
  ia3_k_after_rope: bool = False
  # LoFiT ('lofit', peft/lofit.py): phase 1 learns head scales (1 + A),
  # phase 2 bias offsets on lofit_heads (flat layer·n_heads + head ids,
  # from `lofit.phase2_config`); init N(0, lofit_init_std²); L1 on A.
  lofit_phase: int = 1
  lofit_heads: tuple[int, ...] = ()
  lofit_head_dim: int = 0  # phase 2: K (phase2_config sets both)
  lofit_init_std: float = 1e-3
  lofit_l1: float = 5e-4
  # The two phases as one run (train/tasks.py): phase 1 trains this many
  # steps in WORKDIR/lofit_phase1, then phase 2 (total_steps) on the top
  # lofit_top_k heads (0 = 3% of all heads, the paper's ratio).
  lofit_phase1_steps: int = 0
  lofit_top_k: int = 0

  def validate(self):
    if self.method not in _REGISTRY:
      raise errors.ConfigError(
          f"config.peft.method: unknown method '{self.method}' "
          f"(known: {sorted(_REGISTRY)})")
    for p in self.trainable + self.targets:
      try:
        re.compile(p)
      except re.error as e:
        raise errors.ConfigError(f"config.peft: bad regex '{p}': {e}") \
            from None


class EventContext(NamedTuple):
  """What the host loop lends a method for its events (`on_start`,
  `on_step`): state transformations between jitted steps, such as SpIEL's
  drop/grow or a data-driven mask."""
  # (trainable, frozen, batch, rng) -> mean token loss; jit-able.
  objective: Callable
  next_batch: Callable[[], dict]  # a global batch from the training data
  state_shardings: Any  # the TrainState's shardings (keep them on update)
  tx: Any  # the run's optax transformation
  make_tx: Callable  # trainable tree -> optax tx from config.optim
  total_steps: int
  model_cfg: Any = None  # the ModelConfig (activation capture: EVA, CorDA)


class Method:
  """A PEFT method. Subclasses override what differs from full FT."""

  seam: Seam = Seam()

  def __init__(self, cfg: PeftConfig):
    self.cfg = cfg

  def init(self, rng, params) -> tuple[dict, dict]:
    """Model params -> (trainable, frozen) trees. Must be jit-able."""
    del rng
    return params, {}

  def assemble(self, trainable, frozen, rng=None) -> tuple[dict, Any]:
    """(trainable, frozen) -> (model params, adapters) for the forward."""
    del rng
    return tree.merge(trainable, frozen), None

  def reference(self, trainable, frozen) -> tuple[dict, Any]:
    """(model params, adapters) of the reference model for losses that
    need one: the base model before fine-tuning. Adapter methods return the
    frozen base with adapters off; full fine-tuning has no such copy."""
    del trainable, frozen
    raise errors.ConfigError(
        f"config.loss.name needs a reference model, which peft.method "
        f"'{self.cfg.method}' does not keep (use an adapter method such as "
        "'lora': its reference is the base with adapters off)")

  def merged(self, trainable, frozen) -> dict:
    """Plain model params with the method folded in (for export)."""
    return self.assemble(trainable, frozen)[0]

  @property
  def has_merged_form(self) -> bool:
    """False when the method has no plain-weights form (virtual tokens,
    post-RoPE scales, head biases): `merged` raises, and export writes the
    adapter next to the unchanged base instead."""
    return True

  def axes(self, model_axes) -> tuple[dict, dict]:
    """Logical axis names of (trainable, frozen), given the model's."""
    return model_axes, {}

  def lora_scales(self) -> dict[str, float]:
    """{module path: s} of the adapted modules with `lora_a`/`lora_b`
    leaves (LoRA-Pro's optimizer needs them); {} for other methods."""
    return {}

  # False for adapters on a frozen base: the backward computes no gradient
  # of the base matmul weights (the trainer's FLOP/s count 4N, not 6N).
  # Full, partial and sparse fine-tuning need them (a sparse delta's
  # gradient is gathered from the dense one).
  trains_base_weights: bool = True

  # True: the forward collects the seams' side outputs for `aux_loss`.
  wants_model_aux: bool = False

  def aux_loss(self, side: dict, segment_ids_BxL) -> tuple[Any, dict]:
    """(penalty, metrics) from the seams' side outputs (`models.hidden(...,
    return_aux=True)`; segment id 0 marks padding): `penalty` (a scalar,
    coefficients applied) is added to the mean token loss; `metrics` are
    scalars to log (e.g. MoE-LoRA's balance loss)."""
    del side, segment_ids_BxL
    return 0.0, {}

  def export_adapter(self, trainable, frozen, model_cfg, out_dir) -> bool:
    """Writes a Hugging Face PEFT-format adapter dir (adapter_config.json +
    adapter_model.safetensors); False if the method has no such form."""
    del trainable, frozen, model_cfg, out_dir
    return False

  def export_delta(self, trainable, frozen, out_dir) -> bool:
    """Writes sparse deltas (indices + values safetensors); False if the
    method has no such form."""
    del trainable, frozen, out_dir
    return False

  def wrap_tx(self, tx):
    """The optimizer the method trains with (e.g. update masks)."""
    return tx

  def on_start(self, state, ctx: EventContext):
    """Host event before the first step of a fresh run -> new state."""
    del ctx
    return state

  def on_step(self, state, step: int, ctx: EventContext):
    """Host event after optimizer step `step` (1-based) -> new state."""
    del step, ctx
    return state


_REGISTRY: dict[str, Callable[[PeftConfig], Method]] = {}


def register(name: str):
  def deco(cls):
    if name in _REGISTRY:
      raise ValueError(f"peft method '{name}' registered twice")
    _REGISTRY[name] = cls
    return cls
  return deco


def get(cfg: PeftConfig) -> Method:
  return _REGISTRY[cfg.method](cfg)


register("none")(Method)


@register("freeze")
class Freeze(Method):
  """Trains only params whose names match `peft.trainable` (e.g. norms,
  the MLPs, or BitFit-style biases); the rest is frozen data."""

  def _is_trainable(self, name: str) -> bool:
    return any(re.fullmatch(p, name) for p in self.cfg.trainable)

  def init(self, rng, params):
    del rng
    names = tree.flatten(params)
    for p in self.cfg.trainable:
      if not any(re.fullmatch(p, n) for n in names):
        raise errors.ConfigError(
            f"config.peft.trainable: '{p}' matches no parameter")
    return tree.split(params, self._is_trainable)

  def axes(self, model_axes):
    return tree.split(model_axes, self._is_trainable, is_leaf=tree.is_axes)
