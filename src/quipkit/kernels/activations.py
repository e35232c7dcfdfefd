"""Activations rounded to int8, so that the CPU's integer kernels multiply bytes (`--int8-activations`).

A 2-bit layer's fused kernel spends most of its time decoding weights into float32 lanes and
multiplying them there. With the activations in int8, E8P's weights (4 x a point is an integer),
QTIP's 1MAD values (a byte sum) and the 4- and 8-bit grids' codes multiply as bytes, 64 per VNNI
instruction, with exact int32 sums. Each activation row is rounded in blocks of BLOCK columns with
one scale per block, amax / 127, as llama.cpp's Q8_0 rounds its activations (in blocks of 32).

The setting is the process's (`set_activations`; the CLI's `--int8-activations`, and `quipkit
generate`'s default where the CPU tier has the integer kernels) and reaches only
the layers an integer kernel serves (`has_integer_kernel`). Every path of those layers multiplies
the same rounded numbers: the AVX-512 tier's integer kernels, the other tiers' float kernels on
q x scale (no speed-up there: `quipkit info --kernels` says which), and here `rounded` before the
prefill GEMM, the reference and the GPU kernels. So prefill and decode agree, and
`rounded` followed by the reference is the integer kernels' test oracle.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

BLOCK = 64
KINDS = {"float": 32, "int8": 8}
_kind = "float"


def set_activations(kind: str) -> None:
    """'int8': round the activations of the layers an integer kernel serves; 'float': do not."""
    global _kind
    if kind not in KINDS:
        raise ValueError(f"activations must be one of {sorted(KINDS)}, not {kind!r}")
    from quipkit import native

    if native.available():
        native.module().activations(KINDS[kind])
    _kind = kind


def activations() -> str:
    return _kind


@contextmanager
def using_activations(kind: str) -> Iterator[None]:
    """`kind` for the block (one CLI command), then the setting before it again."""
    before = _kind
    set_activations(kind)
    try:
        yield
    finally:
        set_activations(before)


def rounds(codebook, cols: int) -> bool:
    """Whether this layer's activations are rounded now: the setting is int8 and an integer kernel serves it."""
    return _kind == "int8" and has_integer_kernel(codebook, cols)


def has_integer_kernel(codebook, cols: int) -> bool:
    """E8P without a second stage, QTIP's 1MAD trellis code (one value per state), and 4- and 8-bit
    grids whose groups are whole blocks, with rows of whole blocks (module.c's q8_applies, the same rule)."""
    if cols % BLOCK:
        return False
    if codebook.name == "e8p":
        return True
    if codebook.name == "trellis":
        return codebook.code == "1mad" and codebook.values_per_state == 1
    if codebook.name == "scalar":
        return codebook.bits in (4, 8) and codebook.group_size % BLOCK == 0
    return codebook.name == "uniform" and codebook.bits in (4, 8)


def quantize(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., cols] (cols a multiple of BLOCK) -> q int8 [..., cols], scales float32 [..., cols / BLOCK].

    q = round(x * (127 / amax)) per block, ties to even; a block of zeros gets q = 0 and scale 0, one
    holding a NaN or an infinity q = 0 and scale NaN (its outputs are NaN, as x W^T's would be)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    finite = blocks.isfinite().all(-1, keepdim=True)
    usable = (amax > 0) & finite
    inverse = torch.where(usable, torch.tensor(127.0) / torch.where(usable, amax, torch.ones_like(amax)), 0.0)
    q = torch.where(usable, blocks * inverse, 0.0).round().clamp(-127, 127)
    scales = torch.where(finite, amax / torch.tensor(127.0), torch.tensor(float("nan")))
    return q.to(torch.int8).reshape(x.shape), scales.squeeze(-1)


def rounded(x: Tensor) -> Tensor:
    """x with every block replaced by what the integer kernels multiply: q * scale, in x's dtype.
    The oracle; `rounded_fast` is the same numbers from the compiled extension."""
    q, scales = quantize(x)
    blocks = q.float().reshape(*x.shape[:-1], -1, BLOCK) * scales.unsqueeze(-1)
    return blocks.reshape(x.shape).to(x.dtype)


def rounded_fast(x: Tensor) -> Tensor:
    """`rounded` in one pass of C for a float32 contiguous CPU x (a prefill's rows), else `rounded`."""
    from quipkit import native

    if not (native.available() and x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()):
        return rounded(x)
    y = torch.empty_like(x)
    native.module().round_rows(x.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], y.data_ptr(),
                               torch.get_num_threads())
    return y

