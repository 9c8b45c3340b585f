"""Periodic evaluation: token-weighted loss/perplexity and exact match."""
from __future__ import annotations

import math

import jax
import numpy as np

from tunejax import data, models
from tunejax.train import setup


def _exact_match(completion: str, answer: str) -> bool:
  return completion.strip().split("\n")[0].strip() == answer.strip()


class Evaluator:
  """Computes `eval/*` metrics for a TrainState."""

  def __init__(self, cfg, run, tokenizer, eval_cfg, annotate=None):
    self.cfg, self.run, self.tok, self.data_cfg = cfg, run, tokenizer, eval_cfg
    self._annotate = annotate  # wraps the eval iterator (see loop.train)
    self._step = setup.jit_eval_step(run)
    self._examples = None

  def loss(self, state) -> dict:
    it = data.make_iterator(self.data_cfg, self.tok, seed=self.cfg.seed + 1,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
    if self._annotate is not None:
      it = self._annotate(it)
    sums: dict[str, float] = {}
    for _ in range(self.cfg.eval.batches):
      try:
        batch = next(it)
      except StopIteration:
        break
      g = data.to_global(batch, self.run.mesh, self.run.batch_sharding)
      out = jax.device_get(self._step(state.params, state.frozen, g,
                                      state.history))
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + float(v)
    if not sums.get("denom"):
      return {}
    loss = sums["loss_sum"] / sums["denom"]
    # The loss's aux sums as means too (e.g. eval/rewards/accuracy).
    aux = {f"eval/{k[:-4]}": v / sums["denom"] for k, v in sums.items()
           if k.endswith("_sum") and k != "loss_sum"}
    return {"eval/loss": loss, "eval/ppl": math.exp(min(loss, 50.0)), **aux}

  def accuracy(self, state) -> dict:
    n = self.cfg.eval.generate_examples
    if not n or self.data_cfg.format != "prompt_answer":
      return {}
    if self._examples is None:
      self._examples = data.load_prompt_answers(self.data_cfg, self.tok,
                                                limit=n)
    texts = generate_texts(self.run, state, [e["prompt_ids"] for e in
                                             self._examples],
                           self.tok, self.cfg.eval.max_new_tokens,
                           self.cfg.eval.temperature, self.cfg.seed)
    hits = [_exact_match(t, e["answer"]) for t, e in zip(texts, self._examples)]
    return {"eval/accuracy": float(np.mean(hits))}

  def __call__(self, state) -> dict:
    return {**self.loss(state), **self.accuracy(state)}


def generate_texts(run, state, prompt_ids, tokenizer, max_new_tokens,
                   temperature=0.0, seed=0, *, top_k=0, top_p=1.0,
                   num_samples=1) -> list[str]:
  """Decoded completions of `prompt_ids` under the current (adapted) model
  (`num_samples` per prompt, grouped by prompt)."""
  base, adapters = run.method.assemble(state.params, state.frozen)
  out = models.generate(run.model_cfg, base, prompt_ids, max_new_tokens,
                        temperature=temperature, top_k=top_k or None,
                        top_p=top_p if top_p < 1.0 else None,
                        rng=jax.random.PRNGKey(seed),
                        eos_id=tokenizer.eos_id, adapters=adapters,
                        seam=run.method.seam, num_samples=num_samples)
  tokens = np.asarray(out.tokens_BxT)
  lengths = np.asarray(out.lengths_B)
  stop = {tokenizer.eos_id, tokenizer.pad_id}
  return [tokenizer.decode([int(t) for t in row[:n] if int(t) not in stop])
          for row, n in zip(tokens, lengths)]
