"""CPU kernels from the compiled extension (src/quipkit/_native): fused decode + matvec for a few
activation rows, and decode of row tiles followed by torch's GEMM for prefill.

The extension picks its instruction-set tier at run time (AVX-512, AVX2 + FMA, portable C; see
`tier()`) and splits output rows over its own thread pool, as many threads as torch uses. Nothing
here writes a dense weight larger than one tile of TILE_WEIGHTS.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor

from quipkit import native
from quipkit.codebooks.e8p import source_set
from quipkit.codebooks.rvq import e8_one_bit
from quipkit.codebooks.trellis import TILE, _default_values
from quipkit.kernels.dispatch import register_hadamard, register_kernel
from quipkit.transforms.hadamard import hadamard_matrix, orthogonal_op

# Activation rows up to which the fused matvec beats decoding a tile for a GEMM.
MATVEC_MAX_ROWS = 8
# Weights decoded at once on the GEMM path (4 MB of float32).
TILE_WEIGHTS = 1 << 20
_TRELLIS_CODES = {"1mad": 0, "3inst": 1, "hyb": 2, "lut": 3, "lut2": 3}


def tier() -> str | None:
    """The instruction-set tier the compiled kernels run on (avx512, avx2, portable), or None."""
    return native.module().isa() if native.available() else None


@lru_cache(maxsize=1)
def _lattice_tables() -> tuple[Tensor, Tensor, Tensor]:
    """E8P's 256 absolute patterns [256, 8], their sums' parities [256] (uint8), the 1-bit E8 points [256, 8]."""
    patterns = source_set().contiguous()
    parity = (patterns.sum(1).round().to(torch.int64) % 2).to(torch.uint8)
    return patterns, parity, e8_one_bit().contiguous()


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Plan:
    """How one (codebook, shape) calls the extension: its function, the rows a decode block spans,
    the tensors it passes (`arguments(stored)`, None for an absent one) and the static arguments
    that follow them. Built once per spec and shape, so a call costs little more than reading the
    tensors' addresses."""

    __slots__ = ("function", "block", "static", "arguments")

    def __init__(self, function: str, block: int, static: tuple,
                 arguments: Callable[[Sequence[Tensor]], Sequence[Tensor | None]]):
        self.function = getattr(native.module(), function)
        self.block, self.static, self.arguments = block, static, arguments

    def call(self, decode: int, lo: int, hi: int, x: Tensor | None, batch: int, rows: int, cols: int, y: Tensor,
             stored: Sequence[Tensor]) -> None:
        tensors = [t if t is None or t.is_contiguous() else t.contiguous() for t in self.arguments(stored)]
        self.function(decode, lo, hi, torch.get_num_threads(), _ptr(x), batch, rows, cols, y.data_ptr(),
                      *[_ptr(t) for t in tensors], *self.static)


def _padded(count: int) -> Callable[[Sequence[Tensor]], Sequence[Tensor | None]]:
    """The stored tensors as they are, padded with None to `count` (e.g. a grid without scales)."""
    return lambda stored: list(stored) + [None] * (count - len(stored))


def _grid_plan(codebook, rows: int, cols: int) -> Plan:
    row_bytes = codebook.storage(rows, cols)["codes"][0][1]
    if codebook.name == "uniform":
        static = (row_bytes, codebook.bits, cols, 1, codebook.step, codebook.range / codebook.step)
    else:
        static = (row_bytes, codebook.bits, codebook.group_size, codebook.groups(cols), 0.0, 0.0)
    return Plan("grid", 1, static, _padded(3))


def _lattice_plan(codebook, rows: int, cols: int) -> Plan:
    patterns, parity, one_bit = _lattice_tables()
    second = 0 if codebook.name == "e8p" else (1 if codebook.bits == 3 else 2)
    inverse = 1.0 / codebook.residual_scale if second else 0.0
    return Plan("lattice", 1, (second, patterns.data_ptr(), parity.data_ptr(), one_bit.data_ptr(), inverse),
                _padded(2))


def _trellis_plan(codebook, rows: int, cols: int) -> Plan:
    static = (codebook.L, codebook.bits, codebook.values_per_state, _TRELLIS_CODES[codebook.code])
    if codebook.code == "hyb":  # the stored fp16 table [512, 2], in float32 (1,024 values per call)
        return Plan("trellis", TILE, static, lambda stored: (stored[0], stored[1].float()))
    table = _default_values(codebook.code, codebook.L) if codebook.code.startswith("lut") else None
    return Plan("trellis", TILE, static, lambda stored: (stored[0], table))


_PLANNERS: dict[str, Callable[[object, int, int], Plan]] = {
    "scalar": _grid_plan,
    "uniform": _grid_plan,
    "e8p": _lattice_plan,
    "rvq": _lattice_plan,
    "trellis": _trellis_plan,
    "dense": lambda codebook, rows, cols: Plan("bf16", 1, (), _padded(1)),
}


@lru_cache(maxsize=4096)
def plan(codebook, rows: int, cols: int) -> Plan:
    return _PLANNERS[codebook.name](codebook, rows, cols)


def matvec(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """x [..., cols] (float32, contiguous) @ W^T -> [..., rows], decoding W in registers."""
    y = torch.empty(*x.shape[:-1], rows)
    plan(codebook, rows, cols).call(0, 0, 0, x, x.numel() // cols, rows, cols, y, tensors)
    return y


def decode_rows(tensors: Sequence[Tensor], codebook, rows: int, cols: int, lo: int, hi: int,
                out: Tensor | None = None) -> Tensor:
    """Rows [lo, hi) of W -> float32 [hi - lo, cols] (into `out` when given)."""
    w = out if out is not None else torch.empty(hi - lo, cols)
    if codebook.name == "dense":  # already dense: a conversion
        return w.copy_(tensors[0][lo:hi])
    plan(codebook, rows, cols).call(1, lo, hi, None, 0, rows, cols, w, tensors)
    return w


def tiled_matmul(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """x [..., cols] @ W^T for many rows: decode W a tile of rows at a time, multiply each with torch."""
    lead = x.shape[:-1]
    x = x.reshape(-1, cols)
    block = plan(codebook, rows, cols).block
    per_tile = max(block, TILE_WEIGHTS // cols // block * block)
    tile = torch.empty(min(per_tile, rows), cols)
    if per_tile >= rows:
        return (x @ decode_rows(tensors, codebook, rows, cols, 0, rows, tile).t()).reshape(*lead, rows)
    y = torch.empty(x.shape[0], rows)
    for lo in range(0, rows, per_tile):
        hi = min(rows, lo + per_tile)
        y[:, lo:hi] = x @ decode_rows(tensors, codebook, rows, cols, lo, hi, tile[: hi - lo]).t()
    return y.reshape(*lead, rows)


def _fused_applies(x: Tensor, codebook, rows: int, cols: int) -> bool:
    return x.numel() // cols <= MATVEC_MAX_ROWS and (codebook.name != "dense" or codebook.bits == 16)


def _tiled_applies(x: Tensor, codebook, rows: int, cols: int) -> bool:
    return x.numel() // cols > MATVEC_MAX_ROWS and (codebook.name != "dense" or codebook.bits == 16)


def _hadamard_applies(x: Tensor) -> bool:
    return orthogonal_op(x.shape[-1]).factor is not None


@lru_cache(maxsize=64)
def _hadamard_factor(k: int, transpose: bool) -> Tensor:
    """H_K or its transpose [K, K], row-major, as the extension reads it."""
    h = hadamard_matrix(k)
    return (h.t() if transpose else h).contiguous()


def hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """post ⊙ Had_n^(T if transpose) (pre ⊙ x) for x [..., n] (float32, contiguous), sign vectors fp16."""
    n = x.shape[-1]
    k = orthogonal_op(n).factor
    hk = _hadamard_factor(k, transpose) if k > 1 else None
    pre = pre.to(torch.float16).contiguous() if pre is not None else None
    post = post.to(torch.float16).contiguous() if post is not None else None
    y = torch.empty_like(x)
    native.module().hadamard(0, 0, 0, torch.get_num_threads(), x.data_ptr(), x.numel() // n, 0, n, y.data_ptr(), k,
                             _ptr(hk), _ptr(pre), _ptr(post))
    return y


if native.available():
    register_kernel("cpu-fused-matvec", list(_PLANNERS), "cpu", _fused_applies, matvec)
    register_kernel("cpu-tiled-gemm", list(_PLANNERS), "cpu", _tiled_applies, tiled_matmul)
    register_hadamard("cpu-hadamard", "cpu", _hadamard_applies, hadamard)
