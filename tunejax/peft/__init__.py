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
