"""`config.task` dispatch: sft, dpo, reward, eval, export, generate,
compile."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

from tunejax import errors, models
from tunejax.checkpoint import Checkpointer, abstract
from tunejax.peft import lofit, peft_format, prompt
from tunejax.train import aot, evaluate, loop, setup
from tunejax.train.config import Config, eval_data


def _prepare_workdir(workdir: str, cfg: Config):
  try:
    os.makedirs(workdir, exist_ok=True)
    # One probe per process: hosts sharing a workdir (and the processes of
    # a local multi-process run) raced on one name, one removing it under
    # another's `os.remove`.
    probe = os.path.join(
        workdir, f".write_test.{jax.process_index()}.{os.getpid()}")
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


def use_compile_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path` ('' = no change).

  A compiled step is stored under a key of its program, shapes and
  backend, and later processes load it instead of compiling: a restart
  after preemption, a sweep's next run. On a GPU that also skips XLA's
  autotuning (the float32 W1 step compiled in 176 s on an H100, 32 s of
  it without autotuning). JAX checks the cache setting at its first
  compilation, so the cache is reset for an in-process change to count.
  """
  if not path:
    return
  path = os.path.abspath(os.path.expanduser(path))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(
        f"config.compile_cache: cannot create {path} ({e.strerror})") from None
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()


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


def _hf_base_dir(ms) -> str | None:
  """The HF checkpoint dir the run's base weights came from unchanged, or
  None (a preset, a .gguf, random init, architecture overrides)."""
  if ms.random_init or ms.overrides or not os.path.isfile(
      os.path.join(ms.name, "config.json")):
    return None
  return os.path.abspath(ms.name)


def export(cfg, workdir, state, run) -> str:
  """Writes WORKDIR/export and returns its main artifact's path.

  Methods with a weight form: the merged HF checkpoint (export/hf, the
  returned path), plus the PEFT-format adapter (export/adapter) where PEFT
  can represent the method and sparse deltas (export/delta). Methods
  without one (virtual tokens, head biases, post-RoPE scales): their
  adapter (returned) — PEFT format where PEFT has it, else tunejax's own
  (export/adapter_tunejax) — and the unchanged base as export/hf unless it
  is an HF checkpoint dir on disk already. Each dir is written atomically,
  adapters before the base, and the log lists what was written.
  """
  root, method = os.path.join(workdir, "export"), run.method
  path = lambda name: os.path.join(root, name)
  written, main = [], None
  if method.has_merged_form:
    params = method.merged(state.params, state.frozen)
    models.save_hf(run.model_cfg, jax.device_get(params), path("hf"))
    written.append(("merged HF checkpoint", path("hf")))
    main = path("hf")
  if jax.process_index() == 0:
    trainable, frozen = (jax.device_get(state.params),
                         jax.device_get(state.frozen))
    if method.export_adapter(trainable, frozen, run.model_cfg,
                             path("adapter")):
      written.append(("PEFT-format adapter", path("adapter")))
      main = main or path("adapter")
    elif not method.has_merged_form:
      peft_format.export_native(method.cfg, trainable, path("adapter_tunejax"))
      written.append((f"tunejax adapter (PEFT has no form for "
                      f"'{method.cfg.method}')", path("adapter_tunejax")))
      main = path("adapter_tunejax")
    if method.export_delta(trainable, frozen, path("delta")):
      written.append(("sparse deltas", path("delta")))
  if not method.has_merged_form:
    base_dir = _hf_base_dir(cfg.model)
    if base_dir is None:
      base = method.assemble(state.params, state.frozen)[0]
      models.save_hf(run.model_cfg, jax.device_get(base), path("hf"))
      written.append(("unchanged base HF checkpoint", path("hf")))
    else:
      logging.info("export: base unchanged, use %s as the adapter's base",
                   base_dir)
  if not method.has_merged_form:
    logging.info("export: peft.method '%s' has no merged HF form (nothing "
                 "to fold into the weights); exporting its adapter",
                 method.cfg.method)
  for what, where in written:
    logging.info("export: wrote %s to %s", what, where)
  return main or path("adapter_tunejax")


def _lofit_phase1(cfg, workdir, model_cfg, params, tokenizer):
  """LoFiT as one recipe (`peft.lofit_phase1_steps` > 0): phase 1 (head
  scales) in WORKDIR/lofit_phase1 — trained (or resumed) for task=sft,
  restored for the other tasks — then (the phase-2 config on its top-K
  heads, phase 1's output)."""
  p = cfg.peft
  if p.lofit_phase != 1 or cfg.task not in ("sft", "eval", "export",
                                            "generate"):
    raise errors.ConfigError(
        "config.peft.lofit_phase1_steps: the LoFiT recipe starts at "
        "lofit_phase=1 and runs with task sft / eval / export / generate")
  cfg1 = dataclasses.replace(
      cfg, task="sft", total_steps=p.lofit_phase1_steps,
      checkpoint=dataclasses.replace(cfg.checkpoint, export_at_end=False))
  wd1 = os.path.join(workdir, "lofit_phase1")
  if cfg.task == "sft":
    _prepare_workdir(wd1, cfg1)
    out = loop.train(cfg1, wd1, model_cfg, params, tokenizer)
  elif os.path.isdir(os.path.join(wd1, "checkpoints")):
    out = {"state": _restored_state(cfg1, wd1, model_cfg, params)[0],
           "preempted": False}
  else:
    raise errors.ConfigError(
        f"config.peft.lofit_phase1_steps: no phase-1 checkpoint in {wd1} "
        "(run task=sft first)")
  n_heads = model_cfg.n_heads
  k = p.lofit_top_k or max(1, round(0.03 * model_cfg.n_layers * n_heads))
  peft2 = lofit.phase2_config(p, out["state"].params, n_heads, k)
  logging.info("LoFiT phase 1 selected heads (layer*%d + head): %s",
               n_heads, peft2.lofit_heads)
  return dataclasses.replace(cfg, peft=dataclasses.replace(
      peft2, lofit_phase1_steps=0)), out


def run(cfg: Config, workdir: str) -> dict:
  """Runs `cfg.task` in `workdir`; returns a dict of results."""
  _prepare_workdir(workdir, cfg)
  use_compile_cache(cfg.compile_cache)
  tokenizer = setup.load_tokenizer(cfg.model)
  # Soft-prompt init from text: tokenized once, with the run's tokenizer.
  cfg = dataclasses.replace(cfg, peft=prompt.text_ids(cfg.peft, tokenizer))
  if cfg.task == "compile":  # reads no weights
    return aot.compile_report(cfg, workdir, tokenizer)
  model_cfg, params = setup.load_model(cfg.model)
  if cfg.peft.method == "lofit" and cfg.peft.lofit_phase1_steps:
    cfg, phase1 = _lofit_phase1(cfg, workdir, model_cfg, params, tokenizer)
    if phase1["preempted"]:
      return phase1
    _prepare_workdir(workdir, cfg)  # config.json: phase 2, heads included
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
    print(f"exported to {path}")
    return {"export": path}
  prompts = [tokenizer.encode(p, add_bos=True) for p in cfg.eval.prompts]
  if not prompts:
    raise errors.ConfigError("config.eval.prompts: task=generate needs prompts")
  ev = cfg.eval
  texts = evaluate.generate_texts(run_, state, prompts, tokenizer,
                                  ev.max_new_tokens, ev.temperature, cfg.seed,
                                  top_k=ev.top_k, top_p=ev.top_p,
                                  num_samples=ev.num_samples)
  with open(os.path.join(workdir, "generate.jsonl"), "w") as f:
    for i, t in enumerate(texts):
      p = ev.prompts[i // ev.num_samples]
      f.write(json.dumps({"prompt": p, "sample": i % ev.num_samples,
                          "completion": t}) + "\n")
      print(f"{p!r} -> {t!r}")
  return {"texts": texts}
