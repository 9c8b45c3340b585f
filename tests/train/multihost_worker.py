"""One process of a 2-process localhost `jax.distributed` training run.

Usage: python multihost_worker.py PORT PROCESS_ID WORKDIR
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
# The heavy imports come before `initialize`, and the backend starts right
# after it: each process must publish its CPU topology before the other's
# wait for it times out, which a slow import on a loaded machine once broke.
from tests.train.helpers import multihost_config  # noqa: E402
from tunejax import train  # noqa: E402

port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.config.update("jax_cpu_get_local_topology_timeout_minutes", 6)
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=pid)
jax.config.update("jax_threefry_partitionable", True)
assert jax.device_count() == 2, jax.devices()

train.run(multihost_config(), workdir)
print(f"process {jax.process_index()} of {jax.process_count()} done")
