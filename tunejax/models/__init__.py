"""Decoder Transformer models: configs, forward, weights I/O, generation.

Public API (DESIGN.md): `ModelConfig`, `preset`, `PRESETS`, `init`,
`param_axes`, `hidden`, `unembedding`, `forward`, `load`, `load_config`,
`save_hf`, `generate` (and `split_layers`, its per-layer weight layout),
and the PEFT seam base class `Seam`.
"""
from tunejax.models.config import ModelConfig, PRESETS, preset
from tunejax.models.generate import GenerateOutput, generate
from tunejax.models.hf import load, load_config, save_hf
from tunejax.models.seam import ACT_POINTS, Seam
from tunejax.models.params import init, param_axes, param_specs
from tunejax.models.transformer import (
    forward, hidden, logits_from_hidden, split_layers, unembedding)
