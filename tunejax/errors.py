"""Exception types that `tunejax.main` prints as one line (no traceback)."""


class TunejaxError(Exception):
  """Base class: a user-facing problem with input, config, data or files."""


class ConfigError(TunejaxError):
  """A config key is unknown, mistyped or has a bad value."""


class DataError(TunejaxError):
  """A data file or row is malformed."""


class ModelError(TunejaxError):
  """A model checkpoint is missing, unsupported or inconsistent."""


class CheckpointError(TunejaxError):
  """A training checkpoint cannot be saved or restored."""


class NonFiniteLossError(TunejaxError):
  """Training produced a NaN/Inf loss."""
