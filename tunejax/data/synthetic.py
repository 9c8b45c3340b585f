"""Small verifiable tasks: deterministic generators and an exact-match check.

Every example is `{'prompt', 'completion', 'answer'}` with
`completion == answer`, so one file serves the `prompt_completion` (SFT),
`prompt_answer` (generation eval, RL rewards) formats alike. Prompts are short
and fixed-form so that a small base model (Gemma 3 270M) learns `add2` or
`reverse3` within ~100 short steps:

  add1      '3+4='             -> '7'
  add2      '12+34='           -> '46'
  add3      '123+456='         -> '579'
  add4      '1234+5678='       -> '6912'
  sub2      '56-12='           -> '44'        (non-negative results)
  mul1      '7*8='             -> '56'
  mul2      '12*34='           -> '408'
  reverse3  'Reverse: cat ->'  -> ' tac'
  reverse5  'Reverse: apple ->' -> ' elppa'
  sort4     'Sort: 3 1 4 2 ->' -> ' 1 2 3 4'

`make_examples(task, n, seed)` is a pure function of its arguments (string
seeding of `random.Random` is stable across Python runs and platforms) and
returns distinct examples while the task has enough of them.

Each example also carries a preference pair for the `preference` format:
`chosen` (the answer) and `rejected` (the answer corrupted in one place:
one digit changed, or two characters swapped), drawn from a separate
stream so the other fields do not depend on it.
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import Callable

from tunejax import errors

_Gen = Callable[[random.Random], tuple[str, str]]


def _add(digits: int) -> _Gen:
  lo, hi = 10 ** (digits - 1), 10 ** digits - 1
  def gen(rng):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}+{b}=", str(a + b)
  return gen


def _sub2(rng):
  a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
  return f"{a}-{b}=", str(a - b)


def _mul(digits: int) -> _Gen:
  lo, hi = (2 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1
  def gen(rng):
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}*{b}=", str(a * b)
  return gen


def _reverse(length: int) -> _Gen:
  def gen(rng):
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(length))
    return f"Reverse: {word} ->", " " + word[::-1]
  return gen


def _sort4(rng):
  digits = [rng.randint(0, 9) for _ in range(4)]
  return (f"Sort: {' '.join(map(str, digits))} ->",
          " " + " ".join(map(str, sorted(digits))))


TASKS: dict[str, _Gen] = {
    "add1": _add(1), "add2": _add(2), "add3": _add(3), "add4": _add(4),
    "sub2": _sub2,
    "mul1": _mul(1), "mul2": _mul(2), "reverse3": _reverse(3),
    "reverse5": _reverse(5), "sort4": _sort4,
}


def make_examples(task: str, n: int, seed: int) -> list[dict[str, str]]:
  """`n` examples of `task`, deterministic in `(task, n, seed)`."""
  if task not in TASKS:
    raise errors.ConfigError(
        f"config.data.synthetic_task: expected one of {sorted(TASKS)}, got "
        f"{task!r}")
  rng = random.Random(f"tunejax/{task}/{seed}")
  gen, seen, out = TASKS[task], set(), []
  # Retry duplicates a bounded number of times, so tasks with few distinct
  # examples (mul1) still return n of them.
  attempts = 0
  while len(out) < n:
    prompt, answer = gen(rng)
    attempts += 1
    if prompt in seen and attempts < 20 * n:
      continue
    seen.add(prompt)
    out.append({"prompt": prompt, "completion": answer, "answer": answer})
  bad = random.Random(f"tunejax/{task}/{seed}/rejected")
  for ex in out:
    ex["chosen"], ex["rejected"] = ex["answer"], corrupt(ex["answer"], bad)
  return out


def corrupt(answer: str, rng: random.Random) -> str:
  """A plausible wrong answer: one digit changed, else two chars swapped."""
  digits = [i for i, c in enumerate(answer) if c.isdigit()]
  if digits:
    i = rng.choice(digits)
    lead = i == digits[0] and len(digits) > 1
    choices = [d for d in "0123456789"[1 if lead else 0:] if d != answer[i]]
    return answer[:i] + rng.choice(choices) + answer[i + 1:]
  chars = [i for i, c in enumerate(answer) if not c.isspace()]
  for _ in range(20):
    i, j = sorted(rng.sample(chars, 2))
    if answer[i] != answer[j]:
      return answer[:i] + answer[j] + answer[i + 1:j] + answer[i] + answer[
          j + 1:]
  return answer + answer[-1]


def _normalise(text: str) -> str:
  return " ".join(text.split())


def check(task: str, completion: str, answer: str) -> bool:
  """Exact match of the completion's first line with the answer.

  Whitespace is normalised (a model may or may not emit the leading space)
  and text after the first newline is ignored, since base models keep
  generating past the answer.
  """
  del task  # Every task is exact-match; kept for task-specific checkers.
  first_line = completion.lstrip(" ").split("\n", 1)[0]
  return bool(first_line.strip()) and _normalise(first_line) == _normalise(
      answer)


def write_jsonl(path: str, examples: list[dict]) -> str:
  """Writes one JSON object per line; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for ex in examples:
      f.write(json.dumps(ex, ensure_ascii=False) + "\n")
  return path
