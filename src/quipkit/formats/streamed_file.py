"""One safetensors file written a tensor at a time from the files that hold its tensors.

`safetensors.torch.save_file` needs every tensor in memory at once; a checkpoint assembled from a
run's block files would then hold the whole result (0.9 GB for a 1.1B model at 4 bits) at the end of
a run that otherwise holds one block. This writer lays the file out exactly as save_file does (its
tensors ordered by dtype, widest first, then by name; a compact JSON header padded with spaces to 8
bytes), so the bytes are the same (save_file orders several metadata keys at random; here they are
sorted), and reads each tensor only while writing it.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import Tensor

# safetensors' dtype names, in its order (a file holds the widest dtypes first, in reverse of this)
_DTYPES = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.uint16: "U16",
    torch.float16: "F16", torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
    torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64",
}
_RANK = {name: rank for rank, name in enumerate(_DTYPES.values())}
_BY_NAME = {name: dtype for dtype, name in _DTYPES.items()}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name ("BF16", "F32", ...)."""
    return _BY_NAME[name]


class TensorSource:
    """A tensor's dtype and shape, and how to read it when its turn comes."""

    def __init__(self, dtype: str, shape: list[int], read: Callable[[], Tensor]) -> None:
        self.dtype, self.shape, self.read = dtype, list(shape), read

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _BY_NAME[self.dtype].itemsize

    @classmethod
    def held(cls, tensor: Tensor) -> "TensorSource":
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"safetensors has no dtype for {tensor.dtype}")
        return cls(_DTYPES[tensor.dtype], list(tensor.shape), lambda: tensor)


def sources_in(path: Path) -> dict[str, TensorSource]:
    """Every tensor of the safetensors file `path`, described without reading its data."""
    with safe_open(str(path), "pt") as handle:
        described = {key: handle.get_slice(key) for key in handle.keys()}
        listing = {key: (part.get_dtype(), part.get_shape()) for key, part in described.items()}

    def reader(key: str) -> Callable[[], Tensor]:
        def read() -> Tensor:
            with safe_open(str(path), "pt") as handle:  # opened per tensor: read pages are let go at once
                return handle.get_tensor(key)
        return read

    return {key: TensorSource(dtype, shape, reader(key)) for key, (dtype, shape) in listing.items()}


def write_safetensors(path: Path, tensors: dict[str, TensorSource], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to the safetensors file `path`, each read only while it is written."""
    order = sorted(tensors, key=lambda name: (-_RANK[tensors[name].dtype], name))
    header: dict[str, object] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offset = 0
    for name in order:
        source = tensors[name]
        header[name] = {"dtype": source.dtype, "shape": source.shape, "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for name in order:
            tensor = tensors[name].read()
            if tensor.dtype != _BY_NAME[tensors[name].dtype] or list(tensor.shape) != tensors[name].shape:
                raise ValueError(f"{name} changed between its description and its reading")
            handle.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            del tensor
