"""Read a GGUF file's key-value metadata without touching its tensors: a preflight check (the
model's context, say) should take milliseconds, not the seconds a full reader takes to map every
tensor. The layout is GGUF v2/v3: magic, version, tensor count, key count, then (key, type, value)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) < size:
        raise ValueError("GGUF metadata ends early")
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    return handle.read(_read(handle, "<Q")).decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int, keep: bool) -> Any:
    if kind in _SCALARS:
        return _read(handle, _SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        inner, count = _read(handle, "<I"), _read(handle, "<Q")
        if inner in _SCALARS and not keep:  # skip fixed-size arrays without decoding them
            handle.seek(count * struct.calcsize(_SCALARS[inner]), 1)
            return None
        values = [_value(handle, inner, keep) for _ in range(count)]
        return values if keep else None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_metadata(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """{key: value} of the metadata keys (e.g. 'general.architecture') for which `wanted` is true.
    ValueError when the file is not GGUF or its metadata is cut short."""
    found: dict[str, Any] = {}
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(handle, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old")
        _read(handle, "<Q")  # tensors
        for _ in range(_read(handle, "<Q")):
            key = _string(handle)
            keep = wanted(key)
            value = _value(handle, _read(handle, "<I"), keep)
            if keep:
                found[key] = value
    return found
