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
from torch.utils.weak import WeakTensorKeyDictionary

from quipkit import native
from quipkit.codebooks.e8p import pattern_parity, signed_patterns, source_set
from quipkit.codebooks.outlier_positions import row_starts
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
def _lattice_tables() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """What the lattice kernels read: E8P's patterns [256, 8], their parities [256], the patterns with
    coordinate 7 signed [512, 8] (codebooks/e8p.py), the 1-bit E8 points [256, 8], and each pattern as
    one 16-bit word [256] (a_i - 1/2, which is 0, 1 or 2, in bits 2i and 2i + 1: the integer-activation
    kernels' form)."""
    patterns = source_set().contiguous()
    fields = (patterns - 0.5).to(torch.int32) << (2 * torch.arange(8, dtype=torch.int32))
    words = fields.sum(1, dtype=torch.int32).to(torch.int16)  # the bits of a uint16, as the C code reads them
    return patterns, pattern_parity(), signed_patterns(), e8_one_bit().contiguous(), words


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class Plan:
    """How one (codebook, shape) calls the extension: its function, the rows a decode block spans,
    the tensors it passes (`arguments(stored)`, None for an absent one) and the static arguments
    that follow them. Built once per spec and shape, so a call costs little more than reading the
    tensors' addresses."""

    __slots__ = ("function", "block", "static", "arguments", "dtypes")

    def __init__(self, function: str, block: int, static: tuple,
                 arguments: Callable[[Sequence[Tensor]], Sequence[Tensor | None]]):
        self.function = getattr(native.module(), function)
        self.block, self.static, self.arguments = block, static, arguments
        self.dtypes: tuple[torch.dtype, ...] = ()

    def call(self, decode: int, lo: int, hi: int, x: Tensor | None, batch: int, rows: int, cols: int, y: Tensor,
             stored: Sequence[Tensor]) -> None:
        """Run on `stored` tensors of any dtype and layout (converted to what the C code reads: a model
        moved with .to(dtype) converts fp16 scales too)."""
        stored = [t if t.dtype == d and t.is_contiguous() else t.to(d).contiguous() for t, d in zip(stored, self.dtypes)]
        self.launch(decode, lo, hi, x, batch, rows, cols, y, stored, (0,) * 7)

    def launch(self, decode: int, lo: int, hi: int, x: Tensor | None, batch: int, rows: int, cols: int, y: Tensor,
               stored: Sequence[Tensor], epilogue: tuple) -> None:
        """Run on `stored` tensors already in storage dtypes and contiguous; `epilogue` is the layer's
        (input factor K, H_K, signs, output factor K, H_K, scales, bias) for the one-call path."""
        tensors = self.arguments(stored)  # alive through the call: some are made here (HYB's float table)
        self.function(decode, lo, hi, torch.get_num_threads(), _ptr(x), batch, rows, cols, y.data_ptr(), *epilogue,
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
    patterns, parity, signed, one_bit, words = _lattice_tables()
    second = 0 if codebook.name == "e8p" else (1 if codebook.bits == 3 else 2)
    inverse = 1.0 / codebook.residual_scale if second else 0.0
    return Plan("lattice", 1, (second, patterns.data_ptr(), parity.data_ptr(), signed.data_ptr(), one_bit.data_ptr(),
                               words.data_ptr(), inverse), _padded(2))


def _trellis_plan(codebook, rows: int, cols: int) -> Plan:
    static = (codebook.L, codebook.bits, codebook.values_per_state, _TRELLIS_CODES[codebook.code], codebook.increment or 0)
    if codebook.code == "hyb":  # the stored fp16 table [512, 2], in float32 (1,024 values per call)
        return Plan("trellis", TILE, static, lambda stored: (stored[0], stored[1].float()))
    table = _default_values(codebook.code, codebook.L) if codebook.code.startswith("lut") else None
    return Plan("trellis", TILE, static, lambda stored: (stored[0], table))


# positions tensor -> (its version, int64 [rows] start of each row's code): computed once per layer
_ROW_STARTS = WeakTensorKeyDictionary()


def _row_starts(positions: Tensor, rows: int, per_row: int) -> Tensor:
    """int64 [rows + 1]: where each row's outlier code starts (outlier_positions.row_starts), then the
    whole symbols the stream holds (the kernel's bound); remembered per positions tensor until it
    changes (`_version`), so a call costs no walk over the stream."""
    held = _ROW_STARTS.get(positions)
    if held is None or held[0] != positions._version or held[1].shape[0] != rows + 1:
        width = int(positions[0])
        starts = row_starts(positions[1:], per_row, rows, width)  # first: it rejects a damaged width (0 too)
        symbols = torch.tensor([(positions.shape[0] - 1) * 8 // width if per_row else 0])
        held = (positions._version, torch.cat([starts, symbols]))
        _ROW_STARTS[positions] = held
    return held[1]


def _outlier_plan(codebook, rows: int, cols: int) -> Plan:
    """ICQuant: the inliers' grid (codes, scales, zeros) or table (codes, levels), then the outliers'
    low and step and the positions; the kernel also reads each row's start in the positions."""
    per_row = codebook.outliers(cols)
    inliers = codebook.inliers
    row_bytes = inliers.storage(rows, cols)["codes"][0][1]
    if codebook.inlier_kind == "table":
        static = (row_bytes, codebook.bits, cols, 1, per_row)
        arrange = lambda s: (s[0], None, None, s[1], s[2], s[3], s[4], _row_starts(s[4], rows, per_row))
    else:
        static = (row_bytes, codebook.bits, inliers.group_size, inliers.groups(cols), per_row)
        arrange = lambda s: (s[0], s[1], s[2], None, s[3], s[4], s[5], _row_starts(s[5], rows, per_row))
    return Plan("outlier", 1, static, arrange)


_PLANNERS: dict[str, Callable[[object, int, int], Plan]] = {
    "scalar": _grid_plan,
    "uniform": _grid_plan,
    "e8p": _lattice_plan,
    "rvq": _lattice_plan,
    "trellis": _trellis_plan,
    "icquant": _outlier_plan,
    "dense": lambda codebook, rows, cols: Plan("bf16", 1, (), _padded(1)),
}


@lru_cache(maxsize=4096)
def plan(codebook, rows: int, cols: int) -> Plan:
    p = _PLANNERS[codebook.name](codebook, rows, cols)
    p.dtypes = tuple(dtype for _, dtype in codebook.storage(rows, cols).values())
    return p


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


class OneCallLinear:
    """A layer's eager fast path on the CPU: input Hadamard, matvec and output Hadamard (or none of the
    transforms) and the bias in one call of the extension. Holds only static facts (the plan, the
    Hadamard factors); the layer hands in its tensors on every call. Built by `one_call_linear`."""

    __slots__ = ("plan", "rows", "cols", "max_numel", "static_epilogue")

    def __init__(self, p: Plan, rows: int, cols: int, hadamard_io: bool) -> None:
        self.plan, self.rows, self.cols = p, rows, cols
        self.max_numel = MATVEC_MAX_ROWS * cols
        in_k = out_k = 0
        hk_in = hk_out = 0
        if hadamard_io:
            in_k, out_k = orthogonal_op(cols).factor, orthogonal_op(rows).factor
            hk_in = _hadamard_factor(in_k, True).data_ptr() if in_k > 1 else 0  # cached: the address is stable
            hk_out = _hadamard_factor(out_k, False).data_ptr() if out_k > 1 else 0
        self.static_epilogue = (in_k, hk_in, out_k, hk_out)

    def applies(self, x: Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype is torch.float32 and x.numel() <= self.max_numel and x.is_contiguous()

    def __call__(self, x: Tensor, tensors: Sequence[Tensor], su: Tensor | None, sv: Tensor | None,
                 bias: Tensor | None) -> Tensor:
        """sv ⊙ Had_m (W (Had_n^T (su ⊙ x))) + bias for x [..., cols] (x W^T + bias without signs)."""
        in_k, hk_in, out_k, hk_out = self.static_epilogue
        rows, cols = self.rows, self.cols
        y = torch.empty(*x.shape[:-1], rows)
        self.plan.launch(0, 0, 0, x, x.numel() // cols, rows, cols, y, tensors,
                         (in_k, hk_in, _ptr(su), out_k, hk_out, _ptr(sv), _ptr(bias)))
        return y

    def bound(self, tensors: Sequence[Tensor], su: Tensor | None, sv: Tensor | None,
              bias: Tensor | None) -> Callable[[Tensor], Tensor]:
        """The call with the layer's tensors fixed: x [1, cols] (float32, contiguous, CPU) -> [1, rows].
        Reads every address once, so it is for a loop over tokens in which the layer does not change
        (the lean decoder's); it holds the tensors alive."""
        in_k, hk_in, out_k, hk_out = self.static_epilogue
        rows, cols, function = self.rows, self.cols, self.plan.function
        arguments = list(self.plan.arguments(tensors))  # some are made here (HYB's float table): held below
        held = list(tensors) + [su, sv, bias] + arguments
        fixed = (in_k, hk_in, _ptr(su), out_k, hk_out, _ptr(sv), _ptr(bias), *[_ptr(t) for t in arguments],
                 *self.plan.static)

        def call(x: Tensor) -> Tensor:
            y = torch.empty(1, rows)
            function(0, 0, 0, torch.get_num_threads(), x.data_ptr(), 1, rows, cols, y.data_ptr(), *fixed)
            return y

        call.held = held  # type: ignore[attr-defined]
        return call


def one_call_linear(codebook, rows: int, cols: int, transform: str, tensors: Sequence[Tensor],
                    vectors: Sequence[Tensor | None]) -> OneCallLinear | None:
    """The fast path for a layer whose stored `tensors` and sign/bias `vectors` are as the extension
    reads them (CPU, storage dtypes, contiguous; signs fp16, bias float32), or None."""
    if not native.available() or codebook.name not in _PLANNERS or (codebook.name == "dense" and codebook.bits != 16):
        return None
    if transform not in ("rht", "identity"):
        return None
    hadamard_io = transform == "rht"
    if hadamard_io and (orthogonal_op(cols).factor is None or orthogonal_op(rows).factor is None):
        return None  # a DCT side: the transform ops handle it
    expected = [dtype for _, dtype in codebook.storage(rows, cols).values()]
    if any(t.device.type != "cpu" or t.dtype != d or not t.is_contiguous() for t, d in zip(tensors, expected)):
        return None
    su, sv, bias = vectors
    if any(v is not None and (v.device.type != "cpu" or v.dtype != torch.float16) for v in (su, sv)):
        return None
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return None
    return OneCallLinear(plan(codebook, rows, cols), rows, cols, hadamard_io)


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
    native.module().hadamard(0, 0, 0, torch.get_num_threads(), x.data_ptr(), x.numel() // n, 0, n, y.data_ptr(),
                             *(0,) * 7, k,
                             _ptr(hk), _ptr(pre), _ptr(post))
    return y


if native.available():
    register_kernel("cpu-fused-matvec", list(_PLANNERS), "cpu", _fused_applies, matvec, rounds_activations=True)
    register_kernel("cpu-tiled-gemm", list(_PLANNERS), "cpu", _tiled_applies, tiled_matmul)
    register_hadamard("cpu-hadamard", "cpu", _hadamard_applies, hadamard)
