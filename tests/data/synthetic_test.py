"""Synthetic tasks: deterministic, correct answers, exact-match checker."""
import operator
import re

import pytest

from tunejax import errors
from tunejax.data import DataConfig
from tunejax.data import make_iterator
from tunejax.data import synthetic

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def _solve(prompt):
  """Independent solver from the prompt text alone."""
  m = re.fullmatch(r"(\d+)([+*-])(\d+)=", prompt)
  if m:
    return str(_OPS[m[2]](int(m[1]), int(m[3])))
  m = re.fullmatch(r"Reverse: ([a-z]+) ->", prompt)
  if m:
    return " " + m[1][::-1]
  m = re.fullmatch(r"Sort: ([\d ]+) ->", prompt)
  return " " + " ".join(sorted(m[1].split(), key=int))


@pytest.mark.parametrize("task", sorted(synthetic.TASKS))
def test_answers_are_correct_and_deterministic(task):
  examples = synthetic.make_examples(task, 50, seed=7)
  assert examples == synthetic.make_examples(task, 50, seed=7)
  assert examples != synthetic.make_examples(task, 50, seed=8)
  assert len({e["prompt"] for e in examples}) == 50  # distinct
  for e in examples:
    assert e["answer"] == e["completion"] == _solve(e["prompt"])
    assert synthetic.check(task, e["completion"], e["answer"])


def test_digit_counts():
  for e in synthetic.make_examples("add2", 20, 0):
    a, b = e["prompt"][:-1].split("+")
    assert len(a) == len(b) == 2


@pytest.mark.parametrize("completion,ok", [
    ("46", True), (" 46", True), ("46\n12+30=42", True), ("46 ", True),
    ("460", False), ("4 6", False), ("", False), ("\n46", False),
])
def test_check_is_exact_on_the_first_line(completion, ok):
  assert synthetic.check("add2", completion, "46") is ok


def test_check_normalises_spaces_for_word_tasks():
  assert synthetic.check("reverse3", "tac", " tac")
  assert synthetic.check("sort4", " 1 2  3 4\n", " 1 2 3 4")
  assert not synthetic.check("sort4", " 1 2 3", " 1 2 3 4")


def test_unknown_task():
  with pytest.raises(errors.ConfigError, match="synthetic_task"):
    synthetic.make_examples("add9", 3, 0)


def test_synthetic_source_trains_on_answers(byte_tok):
  cfg = DataConfig(source="synthetic", synthetic_task="add2",
                   synthetic_size=16, format="prompt_completion", seq_len=32,
                   batch_size=2, num_epochs=1)
  answers = []
  for batch in make_iterator(cfg, byte_tok, seed=0):
    for r in range(2):
      seg, mask = batch["segment_ids"][r], batch["loss_mask"][r]
      for s in range(1, seg.max() + 1):
        trained = batch["targets"][r][(seg == s) & (mask > 0)]
        answers.append(byte_tok.decode(trained.tolist()))
  want = [e["answer"] for e in synthetic.make_examples("add2", 16, 0)]
  assert sorted(answers) == sorted(want)
