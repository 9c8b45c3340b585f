"""`config.task` dispatch: sft, dpo, reward, eval, export, generate."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import logging

from tunejax import errors, models
from tunejax.checkpoint import Checkpointer, abstract
from tunejax.peft import prompt
from tunejax.train import evaluate, loop, setup
from tunejax.train.config import Config, eval_data


def _prepare_workdir(workdir: str, cfg: Config):
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise errors.ConfigError(
        f"--workdir={workdir}: not writable ({e.strerror})") from None
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "config.json.tmp")
    with open(tmp, "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)
    os.replace(tmp, os.path.join(workdir, "config.json"))


def _restored_state(cfg, workdir, model_cfg, params):
  """The latest checkpoint's state if any, else the initial state."""
  state, run = setup.build(cfg, model_cfg, params)
  ckdir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckdir):
    ckpt = Checkpointer(ckdir, keep=cfg.checkpoint.keep)
    found = ckpt.restore_latest(abstract(state, run.state_shardings))
    ckpt.close()
    if found is not None:
      state = found[1]
      logging.info("using checkpoint step %d", found[0])
  return state, run


def export(cfg, workdir, state, run) -> str:
  """Writes the merged HF checkpoint to WORKDIR/export/hf and, for methods
  PEFT can represent, the PEFT-format adapter to WORKDIR/export/adapter;
  sparse methods also write their deltas to WORKDIR/export/delta."""
  out = os.path.join(workdir, "export", "hf")
  params = run.method.merged(state.params, state.frozen)
  models.save_hf(run.model_cfg, jax.device_get(params), out)
  if jax.process_index() == 0:
    run.method.export_adapter(jax.device_get(state.params),
                              jax.device_get(state.frozen), run.model_cfg,
                              os.path.join(workdir, "export", "adapter"))
    run.method.export_delta(jax.device_get(state.params),
                            jax.device_get(state.frozen),
                            os.path.join(workdir, "export", "delta"))
  return out


def run(cfg: Config, workdir: str) -> dict:
  """Runs `cfg.task` in `workdir`; returns a dict of results."""
  _prepare_workdir(workdir, cfg)
  model_cfg, params = setup.load_model(cfg.model)
  tokenizer = setup.load_tokenizer(cfg.model)
  # Soft-prompt init from text: tokenized once, with the run's tokenizer.
  cfg = dataclasses.replace(cfg, peft=prompt.text_ids(cfg.peft, tokenizer))
  if cfg.task == "reward":
    from tunejax.train import reward  # pylint: disable=g-import-not-at-top
    return reward.train(cfg, workdir, model_cfg, params, tokenizer)
  if cfg.task in ("sft", "dpo"):
    from tunejax.train import preference  # pylint: disable=g-import-not-at-top
    trainer = preference.train if cfg.task == "dpo" else loop.train
    out = trainer(cfg, workdir, model_cfg, params, tokenizer)
    if cfg.checkpoint.export_at_end and not out["preempted"]:
      out["export"] = export(cfg, workdir, out["state"], out["run"])
    return out
  state, run_ = _restored_state(cfg, workdir, model_cfg, params)
  if cfg.task == "eval":
    ev = evaluate.Evaluator(cfg, run_, tokenizer, eval_data(cfg))
    metrics = ev(state)
    logging.info("eval: %s", metrics)
    print(json.dumps(metrics))
    return {"metrics": metrics}
  if cfg.task == "export":
    path = export(cfg, workdir, state, run_)
    print(f"exported merged HF checkpoint to {path}")
    return {"export": path}
  prompts = [tokenizer.encode(p, add_bos=True) for p in cfg.eval.prompts]
  if not prompts:
    raise errors.ConfigError("config.eval.prompts: task=generate needs prompts")
  texts = evaluate.generate_texts(run_, state, prompts, tokenizer,
                                  cfg.eval.max_new_tokens,
                                  cfg.eval.temperature, cfg.seed)
  with open(os.path.join(workdir, "generate.jsonl"), "w") as f:
    for p, t in zip(cfg.eval.prompts, texts):
      f.write(json.dumps({"prompt": p, "completion": t}) + "\n")
      print(f"{p!r} -> {t!r}")
  return {"texts": texts}
