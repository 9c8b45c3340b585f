"""Entry point: `python -m tunejax.main --config=configs/X.py --workdir=DIR`.

Intentionally short: flags, multi-host init, config validation, dispatch.
A `TunejaxError` is printed as one line (no traceback) with exit code 2.
"""
import os
import re
import sys

if __name__ == "__main__":
  # First, before absl and JAX load: glibc reads its tunables at start.
  from tunejax import host  # pylint: disable=g-import-not-at-top
  host.reexec_with_hugepages("tunejax.main")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

# The embedded default job: the quickstart recipe of this checkout.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "quickstart.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG if os.path.exists(_DEFAULT_CONFIG) else None,
    "Config file (configs/*.py[:arg]); default: configs/quickstart.py.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/quickstart",
                               "Output directory.")
_COORD = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 for multi-host runs (TPU VMs detect it).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Multi-host: processes.")
_PID = flags.DEFINE_integer("process_id", None, "Multi-host: this process.")
_DIST = flags.DEFINE_bool("distributed", False,
                          "Call jax.distributed.initialize() (auto-detect).")


def _main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  if _COORD.value or _DIST.value:
    # Must precede any other JAX call so every host joins one runtime.
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  if not any(a.startswith(("-v", "--verbosity")) for a in sys.argv[1:]):
    # Orbax/absl INFO chatter would bury the progress bar; -v 0 restores it.
    logging.set_verbosity(logging.WARNING)
  # Partitionable threefry: random bits do not depend on the sharding.
  jax.config.update("jax_threefry_partitionable", True)
  from tunejax import errors, train  # pylint: disable=g-import-not-at-top
  from tunejax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    if _WORKDIR.value is None:
      raise errors.ConfigError("--workdir is required")
    cfg = config_lib.from_configdict(_CONFIG.value)
    train.run(cfg, _WORKDIR.value)
  except errors.TunejaxError as e:
    print(f"tunejax: error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing, with config-override mistakes as one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raw = str(e)
    msg = " ".join(raw.split())
    if isinstance(e, (AttributeError, KeyError)):
      bad = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                  and re.search(rf"\b{a.split('=')[0].rsplit('.', 1)[-1]}\b",
                                raw)), "--config")
      hint = re.search(r'Did you mean "([^"]+)"', raw)
      msg = f"{bad}: unknown config key" + (
          f" (did you mean '{hint.group(1)}'?)" if hint else "")
    print(f"tunejax: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main():
  try:
    app.run(_main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  main()
