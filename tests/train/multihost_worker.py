"""One process of a 2-process localhost `jax.distributed` training run.

Usage: python multihost_worker.py PORT PROCESS_ID WORKDIR
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2,
                           process_id=pid)
jax.config.update("jax_threefry_partitionable", True)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
from tests.train.helpers import multihost_config  # noqa: E402
from tunejax import train  # noqa: E402

train.run(multihost_config(), workdir)
print(f"process {jax.process_index()} of {jax.process_count()} done")
