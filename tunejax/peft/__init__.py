"""PEFT methods: pure functions over param trees plus the model's seam.

`get(cfg)` returns a `Method` for `config.peft.method`. A method splits the
model's params into the trainable and frozen trees of `TrainState`, tells
the model which params and adapters to use (`assemble`), and folds itself
back into plain params for export (`merged`).
"""
from tunejax.peft.base import Method, PeftConfig, get, register
from tunejax.peft.peft_format import export_adapter, import_adapter

__all__ = ["Method", "PeftConfig", "get", "register", "export_adapter",
           "import_adapter"]

# Registers lora, rslora, dora, pissa, olora, vera.
from tunejax.peft import lora  # noqa: E402
from tunejax.peft.lora import loraplus_lr_groups  # noqa: E402

__all__ += ["loraplus_lr_groups"]

# Registers qlora (quantised base) and moe_lora (MixLoRA experts).
from tunejax.peft import moe_lora, qlora  # noqa: E402

# Registers sparse, spiel, lt_sft (sparse deltas) and hft (Half Fine-Tuning).
from tunejax.peft import hft, lt_sft, masks, merging, sparse  # noqa: E402

from tunejax.peft.base import EventContext  # noqa: E402

__all__ += ["EventContext", "hft", "masks", "merging", "sparse"]

# Registers eva, corda (data-driven inits), kasa, and the three-matrix
# slora, nlora, inttune.
from tunejax.peft import datadriven, kasa, nlora  # noqa: E402

# Registers prompt, dept, prefix (virtual tokens), ia3 and lofit.
from tunejax.peft import ia3, lofit, prompt  # noqa: E402

__all__ += ["ia3", "lofit", "prompt"]
