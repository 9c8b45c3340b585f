"""Host memory housekeeping (tunejax.host)."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tunejax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resident_bytes():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="needs Linux /proc to read resident memory")
def test_release_returns_freed_small_blocks():
  # What a loader leaves behind: many freed blocks (~330 MB of 16 KiB
  # arrays) between small live ones, so free() cannot merge them into the
  # heap's top and trim it by itself: only malloc_trim returns them.
  blocks, live = [], []
  for _ in range(20_000):
    blocks.append(np.ones(2048))
    live.append(np.ones(64))
  del blocks
  before = _resident_bytes()
  if not host.release_freed_memory():
    pytest.skip("the C library has no malloc_trim")
  # Each 16 KiB hole holds at least three whole 4 KiB pages (240 MB).
  assert before - _resident_bytes() > 160 * 2**20
  del live


def test_release_runs_after_each_compile(monkeypatch):
  calls = []
  monkeypatch.setattr(host, "release_freed_memory",
                      lambda: calls.append(1) or True)
  compiles, counting = [], [True]

  def count(event, secs, **kwargs):
    del secs, kwargs
    if counting[0] and event == "/jax/core/compile/backend_compile_duration":
      compiles.append(1)

  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    host.release_after_compiles()
    host.release_after_compiles()  # idempotent: one listener
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
  finally:
    counting[0] = False  # listeners cannot be removed; this one goes quiet
  assert compiles and len(calls) == len(compiles)


def test_hugepage_env_adds_the_tunable_once():
  assert host.hugepage_env({"A": "1"}) == {
      "A": "1", "GLIBC_TUNABLES": host.HUGEPAGE_TUNABLE}
  merged = host.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert merged["GLIBC_TUNABLES"] == (
      "glibc.malloc.arena_max=2:" + host.HUGEPAGE_TUNABLE)
  # Set already (also to 0 by a user who wants it off): left alone, which
  # also stops `reexec_with_hugepages` from running twice.
  assert host.hugepage_env(merged) is None
  assert host.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None


_FAULTS = """
import resource
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: jnp.sum(jnp.dot(x, x[::-1])[::-1] * 2.0))  # 128 MiB temp
faults = []
for _ in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults)
"""


def _thp_off() -> bool:
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      return "[never]" in f.read()
  except OSError:
    return True


@pytest.mark.skipif(sys.platform != "linux" or _thp_off(),
                    reason="needs Linux with transparent huge pages")
def test_hugepages_cut_the_page_faults_of_xla_temp_blocks():
  """XLA's 128 MiB temp block is mapped afresh every call: 32768 faults of
  4 KiB pages by default, under 3k with the tunable (2 MiB pages; a glibc
  without it ignores the tunable, and the test then fails)."""
  def faults(env):
    env = dict(env, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _FAULTS], env=env,
                         capture_output=True, text=True, timeout=300,
                         check=True).stdout.split()
    return [int(n) for n in out[2:]]  # after the first calls
  plain = dict(os.environ)
  plain.pop("GLIBC_TUNABLES", None)
  small = faults(plain)
  assert min(small) > 30_000
  # Measured 600-2500 per call; a loose bound, as a fragmented host may hand
  # out some 4 KiB pages where 2 MiB ones were asked for.
  assert sum(faults(host.hugepage_env(plain))) < sum(small) / 4


def test_reexec_restarts_once_with_the_tunable(tmp_path):
  """What `python -m tunejax.main` does first: on Linux the module runs
  again, once, with the tunable set, the same arguments and the same
  interpreter options."""
  probe = tmp_path / "probe.py"
  probe.write_text(
      "import os, sys\n"
      "from tunejax import host\n"
      "print('run', os.environ.get('GLIBC_TUNABLES'))\n"
      "host.reexec_with_hugepages('probe')\n"
      "print('after', sys.argv[1:], sys.flags.utf8_mode)\n")
  env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{ROOT}")
  env.pop("GLIBC_TUNABLES", None)
  out = subprocess.run([sys.executable, "-X", "utf8", "-m", "probe", "arg"],
                       env=env,
                       capture_output=True, text=True, timeout=120,
                       check=True).stdout.splitlines()
  if sys.platform != "linux":
    assert out == ["run None", "after ['arg'] 1"]
  else:
    assert out == ["run None", f"run {host.HUGEPAGE_TUNABLE}",
                   "after ['arg'] 1"]  # -X utf8 carried over
