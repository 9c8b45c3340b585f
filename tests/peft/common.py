"""Shared helpers for PEFT tests."""
from tunejax import config as config_lib, models, peft

CFG = models.preset("tiny")


def make_method(**kw) -> peft.Method:
  """A Method from PeftConfig fields, validated like a config section."""
  return peft.get(config_lib.build(peft.PeftConfig, kw, "peft"))
