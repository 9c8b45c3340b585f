"""Host memory housekeeping: huge pages for XLA's per-step blocks, and
freed heap pages handed back to the OS at the moments that set the peak.

glibc keeps freed small and mid-sized blocks mapped. Two parts of a run
free hundreds of MB of them right before its memory peak: loading weights
(dequantised and converted tensors) and XLA compilation (the compiler's
own allocations). Kept, they sit under every step's peak RSS: a LoRA step
on Gemma 3 270M from its GGUF file peaked at 3.14 GB with them and at
2.60 GB without.
"""
import ctypes
import os
import subprocess
import sys

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_hooked = []
# glibc >= 2.35: malloc marks its mmap-served blocks MADV_HUGEPAGE.
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"


def hugepage_env(env) -> dict | None:
  """`env` with glibc's huge-page malloc tunable added to GLIBC_TUNABLES,
  or None where GLIBC_TUNABLES already sets `glibc.malloc.hugetlb` (the
  caller's choice, 0 included, is kept).

  Why: XLA:CPU allocates each execution's temporaries as one block (2.8 GB
  for the W1 LoRA step of bench/train_step.py) and frees it afterwards;
  glibc maps a block that large afresh each time, so every step paid ~700k
  4 KiB page faults (the kernel zeroing each page) and a 0.3 s munmap:
  1.2 s of system time per 3.2 s step on a 2-core VM. Marked for
  transparent huge pages, a step takes a few thousand faults, 0.2 s of system
  time and 2.5-2.6 s, at the same peak RSS. The tunable is read at process
  start only, hence `reexec_with_hugepages`.
  """
  tunables = env.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in tunables:
    return None
  return {**env, "GLIBC_TUNABLES": ":".join(
      t for t in (tunables, HUGEPAGE_TUNABLE) if t)}


def reexec_with_hugepages(module: str) -> None:
  """On Linux, re-runs `python -m module ARGS` with `hugepage_env` unless
  the tunable is set already; returns only then (or off Linux). Call it
  before anything else, as `tunejax.main` does."""
  env = hugepage_env(os.environ) if sys.platform == "linux" else None
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    # The interpreter's own options (-O, -X ..., -W ...) carry over.
    flags = getattr(subprocess, "_args_from_interpreter_flags", list)()
    os.execve(sys.executable,
              [sys.executable, *flags, "-m", module, *sys.argv[1:]], env)


def release_freed_memory() -> bool:
  """Returns the C heap's freed pages to the OS (glibc `malloc_trim`).

  False where the C library has no malloc_trim (e.g. macOS, whose
  allocator returns large frees by itself): nothing to do there.
  """
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):  # not glibc: see the docstring
    return False
  trim(0)
  return True


def release_after_compiles() -> None:
  """From now on, releases freed memory after every XLA compilation of this
  process (before the compiled program first runs). Idempotent."""
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  if not _hooked:
    monitoring.register_event_duration_secs_listener(_on_event)
    _hooked.append(True)


def _on_event(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == _COMPILE_EVENT:
    release_freed_memory()
