"""Data: local sources -> formats -> packing -> deterministic sharded batches.

Public API (the trainer, README and notebooks use these names):

  DataConfig                     the `config.data` section
  make_iterator(cfg, tokenizer, *, seed, process_index=0, process_count=1)
                                 -> DataIterator (get_state / set_state / stats)
  to_global(batch, mesh, sharding=None) -> dict of global jax.Array
  load_prompt_answers(cfg, tokenizer, limit=None) -> [{prompt_ids, prompt,
                                 answer}]
  tfds_build(files, data_dir)    local JSONL/text -> TFDS array_record
  synthetic                      verifiable toy tasks (make_examples, check,
                                 write_jsonl)
"""
from tunejax.data import synthetic
from tunejax.data.config import DataConfig
from tunejax.data.pipeline import DataIterator
from tunejax.data.pipeline import batch_sharding
from tunejax.data.pipeline import make_iterator
from tunejax.data.pipeline import to_global
from tunejax.data.prompts import load_prompt_answers


def tfds_build(*args, **kwargs):
  """See `tunejax.data.tfds_builder.tfds_build` (imports TFDS lazily)."""
  from tunejax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  return tfds_builder.tfds_build(*args, **kwargs)
