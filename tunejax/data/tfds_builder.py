"""TFDS without TensorFlow: build array_record datasets, read prepared ones.

`tfds_build` turns local JSONL / text files into a TFDS `array_record`
dataset named `tunejax_jsonl` (one record per non-empty line, raw line plus
its 'file:line' origin, so bad rows are still reported against the original
file when read). Any prepared TFDS dataset is read through
`tfds.data_source`, which needs no TensorFlow; a registry name that is not
prepared under the data dir fails at once (`download=False`) instead of
retrying downloads for minutes.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tunejax import errors
from tunejax.data import sources

NAME = "tunejax_jsonl"
_RAW_KEYS = {"json", "origin"}


class TunejaxJsonl(tfds.core.GeneratorBasedBuilder):
  """Raw lines of local JSONL / text files, one record per line."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, split_files: Mapping[str, Sequence[str]] | None = None,
               kind: str = "jsonl", text_field: str = "text", **kwargs):
    self._split_files = dict(split_files or {})
    self._kind = kind
    self._text_field = text_field
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo built directly (not from config files next to the module)
    # and unshuffled, so records keep file order; grain shuffles later.
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {"json": tfds.features.Text(), "origin": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    return {split: self._generate_examples(files)
            for split, files in self._split_files.items()}

  def _generate_examples(self, files):
    text_field = self._text_field if self._kind == "text" else None
    src = sources.LineSource(files, text_field=text_field)
    for i in range(len(src)):
      origin, payload = src[i]
      if not isinstance(payload, str):
        payload = json.dumps(payload, ensure_ascii=False)
      yield i, {"json": payload, "origin": origin}


def tfds_build(files: str | Sequence[str] | Mapping[str, Any], data_dir: str,
               *, kind: str = "jsonl", text_field: str = "text") -> str:
  """Builds `tunejax_jsonl` under `data_dir`; returns the dataset directory.

  Args:
    files: a path/glob/dir (the 'train' split), a list of paths, or
      `{split: path(s)}`.
    data_dir: the TFDS data dir to write to (read it back with
      `DataConfig(source='tfds', path='tunejax_jsonl', tfds_data_dir=...)`
      or with `path=<returned directory>`).
    kind: 'jsonl' (each line a JSON object) or 'text' (each line a document
      stored as `{text_field: line}`).
    text_field: field name for 'text' lines.
  """
  if isinstance(files, Mapping):
    split_files = dict(files)
  else:
    split_files = {"train": files}
  split_files = {
      s: [p for f in ([v] if isinstance(v, str) else v)
          for p in sources.expand_paths(f, kind)]
      for s, v in split_files.items()}
  builder = TunejaxJsonl(split_files=split_files, kind=kind,
                         text_field=text_field, data_dir=data_dir,
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  return os.fspath(builder.data_dir)


def _plain(value: Any) -> Any:
  """TFDS values -> plain Python (Text comes back as bytes)."""
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, np.ndarray) and value.dtype == object:
    return [_plain(v) for v in value.tolist()]
  if isinstance(value, np.generic):
    return value.item()
  return value


class TfdsSource:
  """A TFDS data source as `(origin, payload)` records."""

  def __init__(self, data_source, label: str):
    self._src = data_source
    self._label = label

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> tuple[str, Any]:
    record = _plain(self._src[i])
    if isinstance(record, dict) and set(record) == _RAW_KEYS:
      return record["origin"], record["json"]
    return f"{self._label}:{i}", record


def _first_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def open_tfds(path: str, split: str, data_dir: str | None) -> TfdsSource:
  """Reads a prepared dataset (registry name or directory); never downloads."""
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  key = f"config.data.path={path!r}"
  try:
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
      builder = tfds.builder_from_directory(path)
    else:
      builder = tfds.builder(path, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # DatasetNotFoundError, bad dataset_info, ...
    raise errors.DataError(f"{key}: unknown TFDS dataset ({_first_line(e)})"
                           ) from None
  if not builder.is_prepared():
    raise errors.DataError(
        f"{key}: TFDS dataset is not prepared in {where}; tunejax never "
        "downloads, so build it first (tunejax.data.tfds_build for local "
        "JSONL/text files, or the dataset's download_and_prepare)")
  try:
    src = builder.as_data_source(split=split)
  except Exception as e:  # unknown split, tfrecord files (need TensorFlow)
    raise errors.DataError(
        f"{key} split={split!r}: cannot read without TensorFlow "
        f"({_first_line(e)}); prepare it with file_format='array_record'"
        ) from None
  return TfdsSource(src, f"{path}/{split}")
