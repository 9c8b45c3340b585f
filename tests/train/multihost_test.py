"""A real 2-process `jax.distributed` run on localhost (CPU collectives).

Each process reads its own data shard (process_index 0/1 of 2) and feeds
its local rows; the global batch is their concatenation. The reference is a
single process on a 2-device mesh fed exactly those concatenated batches, so
the losses must agree to float tolerance.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from tunejax import data
from tunejax.train import metrics as metrics_lib, setup
from tests.train.helpers import multihost_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _reference_losses(cfg) -> list[float]:
  model_cfg, params = setup.load_model(cfg.model)
  tok = setup.load_tokenizer(cfg.model)
  state, run = setup.build(cfg, model_cfg, params)
  step = setup.jit_train_step(run, 1)
  its = [data.make_iterator(cfg.data, tok, seed=cfg.seed, process_index=i,
                            process_count=2) for i in range(2)]
  losses = []
  for _ in range(cfg.total_steps):
    local = [next(it) for it in its]
    batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
    state, m = step(state, data.to_global(batch, run.mesh, run.batch_sharding),
                    jax.random.PRNGKey(cfg.seed))
    losses.append(float(m["loss"]))
  return losses


def test_two_process_run_matches_single_process(tmp_path):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(port),
       str(i), str(tmp_path)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=400)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  rows = [r for r in metrics_lib.read(str(tmp_path)) if "loss" in r]
  got = [r["loss"] for r in rows]
  want = _reference_losses(multihost_config())
  assert len(got) == len(want) == 3
  np.testing.assert_allclose(got, want, rtol=1e-5)
