"""Bit packing of small unsigned integers, so a checkpoint's size reflects the bits it stores."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def packed_length(count: int, bits: int) -> int:
    """Bytes that `count` values of `bits` bits occupy."""
    return (count * bits + 7) // 8


PACK_VALUES = 1 << 20  # values packed per step: the bit stream of a step is 4 bytes per bit of each


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Pack the last dim of `values` [..., N] (ints in [0, 2^bits)) into uint8 [..., ceil(N * bits / 8)].

    Bit j of value i lands at bit (i * bits + j) of the little-endian byte stream. Rows are packed a
    few at a time: the whole stream at once would be 16 bytes per 4-bit value (2.9 GB for a 7B MLP).
    """
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    lead, count = values.shape[:-1], values.shape[-1]
    if bits == 8:
        return values.to(torch.uint8).contiguous()
    rows = values.reshape(lead.numel(), count)
    packed = torch.empty(rows.shape[0], packed_length(count, bits), dtype=torch.uint8, device=values.device)
    step = max(1, PACK_VALUES // max(count, 1))
    for start in range(0, rows.shape[0], step):
        packed[start:start + step] = _pack_rows(rows[start:start + step], bits)
    return packed.reshape(*lead, packed.shape[-1])


def _pack_rows(values: Tensor, bits: int) -> Tensor:
    """`pack_bits` of values [r, N] in one step."""
    count = values.shape[-1]
    v = values.to(torch.int32)
    shifts = torch.arange(bits, device=v.device, dtype=torch.int32)
    stream = ((v.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(v.shape[0], count * bits)
    pad = packed_length(count, bits) * 8 - count * bits
    if pad:
        stream = torch.nn.functional.pad(stream, (0, pad))
    weights = (1 << torch.arange(8, device=v.device, dtype=torch.int32)).to(torch.uint8)
    return (stream.reshape(stream.shape[0], stream.shape[1] // 8, 8) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 [..., B] -> int32 [..., count]. Runs on every forward, so it is
    one broadcast shift for widths that divide a byte and three gathers for the others."""
    if bits == 8:
        return packed[..., :count].to(torch.int32)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.int32)
        values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask
        return values.reshape(*packed.shape[:-1], -1)[..., :count]
    byte, shift = _offsets(count, bits, packed.device)
    wide = torch.nn.functional.pad(packed, (0, 2)).to(torch.int32)
    window = wide[..., byte] | (wide[..., byte + 1] << 8) | (wide[..., byte + 2] << 16)
    return (window >> shift) & mask


@lru_cache(maxsize=64)
def _offsets(count: int, bits: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(byte index, bit shift) [count] of each value in the packed stream."""
    offsets = torch.arange(count, device=device, dtype=torch.int64) * bits
    return offsets >> 3, (offsets & 7).to(torch.int32)
