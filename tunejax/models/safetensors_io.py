"""Minimal safetensors reader/writer over numpy memmaps (bf16 included).

The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets}} and the raw bytes. Reading through a
memmap lets the loader slice each tensor per shard without a full copy, and
lets us name the file and tensor when a file is truncated or malformed.
"""
from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from tunejax import errors

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
  """Lazy, validated view of one `.safetensors` file."""

  def __init__(self, path: str):
    self.path = path
    try:
      size = os.path.getsize(path)
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
          raise ValueError(f"header of {n} bytes exceeds the file size")
        header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
      raise errors.ModelError(f"{path}: not a valid safetensors file ({e})")
    header.pop("__metadata__", None)
    self._base = 8 + n
    self._header = header
    for name, info in header.items():
      if info.get("dtype") not in _DTYPES:
        raise errors.ModelError(
            f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
      end = info["data_offsets"][1]
      if self._base + end > size:
        raise errors.ModelError(
            f"{path}: truncated file, tensor '{name}' needs bytes up to "
            f"{self._base + end} but the file has {size}")
    self._mm = None

  def keys(self) -> list[str]:
    return list(self._header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a read-only memmap-backed array (no copy)."""
    if self._mm is None:
      self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
    info = self._header[name]
    start, end = info["data_offsets"]
    raw = self._mm[self._base + start:self._base + end]
    return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write(path: str, tensors: dict[str, np.ndarray],
          metadata: dict[str, str] | None = None) -> None:
  """Writes `tensors` (numpy arrays, any supported dtype) to `path`."""
  header, offset, arrays = {}, 0, []
  for name, x in tensors.items():
    x = np.ascontiguousarray(x)
    header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                    "data_offsets": [offset, offset + x.nbytes]}
    offset += x.nbytes
    arrays.append(x)
  header["__metadata__"] = {"format": "pt", **(metadata or {})}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # Keep tensor data 8-byte aligned.
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for x in arrays:
      f.write(x.tobytes())
