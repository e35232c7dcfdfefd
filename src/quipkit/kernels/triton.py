"""GPU kernels in Triton: fused decode + matvec for a few activation rows, decode of row tiles for a
cuBLAS GEMM on longer inputs, and the Hadamard transform, for every codebook.

Imported only when a CUDA tensor reaches the dispatch (never by `import quipkit`). Each weight is
decoded where it is used from the layer's stored tensors, by the same arithmetic as the CPU kernels
(see src/quipkit/_native/kernels.h for the layouts). The tests run these kernels under Triton's
interpreter (TRITON_INTERPRET=1) on the CPU against the eager reference; their speed on a GPU is
measured by bench/decode_speed.py when one is available.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from quipkit.codebooks.e8p import signed_patterns
from quipkit.codebooks.rvq import e8_one_bit
from quipkit.codebooks.trellis import _default_values
from quipkit.kernels.dispatch import register_hadamard, register_kernel
from quipkit.transforms.hadamard import hadamard_matrix, orthogonal_op

MATVEC_MAX_ROWS = 8
TILE_WEIGHTS = 1 << 22
# Kernel families (a constexpr in the kernels below).
GRID, UNIFORM, E8P, RVQ3, RVQ4, TRELLIS, DENSE = range(7)
_CODES = {"1mad": 0, "3inst": 1, "hyb": 2, "lut": 3, "lut2": 3}


# ----------------------------------------------------------------------------------------------
# Decoding one tile of weights, W[r, c] for r [BM, 1] and c [1, BN] (valid where r < rows, c < cols)


@triton.jit
def _bits_at(stream, bit, bits: tl.constexpr, valid):
    """The `bits`-bit value starting at bit offset `bit` of a little-endian byte stream (bits <= 8)."""
    byte = bit >> 3
    lo = tl.load(stream + byte, mask=valid, other=0).to(tl.uint32)
    hi = tl.load(stream + byte + 1, mask=valid & (((bit & 7) + bits) > 8), other=0).to(tl.uint32)
    return ((lo | (hi << 8)) >> (bit & 7).to(tl.uint32)) & ((1 << bits) - 1)


@triton.jit
def _grid_tile(codes, scales, zeros, r, c, valid, row_bytes, group_size, groups, scale, zero,
               BITS: tl.constexpr, UNIFORM_GRID: tl.constexpr):
    q = _bits_at(codes + r * row_bytes, c * BITS, BITS, valid).to(tl.float32)
    if UNIFORM_GRID:
        return scale * (q - zero)
    g = c // group_size
    s = tl.load(scales + r * groups + g, mask=valid, other=0).to(tl.float32)
    z = _bits_at(zeros, (r * groups + g) * BITS, BITS, valid).to(tl.float32)
    return s * (q - z)


@triton.jit
def _e8p_values(codes, table, r, c, valid, groups):
    """E8P: pattern row (index + 256 x parity of the 7 stored signs) from the 512-row table, the
    coordinate's sign from its bit (coordinate 7's is in the row), the +-1/4 shift from bit 15."""
    code = tl.load(codes + r * groups + c // 8, mask=valid, other=0).to(tl.int32) & 0xFFFF
    i = c % 8
    signs = (code >> 8) & 0x7F
    parity = signs ^ (signs >> 4)
    parity = parity ^ (parity >> 2)
    parity = (parity ^ (parity >> 1)) & 1
    a = tl.load(table + ((code & 0xFF) + 256 * parity) * 8 + i, mask=valid, other=0.0)
    negative = (i < 7) & (((signs >> i) & 1) == 1)
    a = tl.where(negative, -a, a)
    return a + tl.where(((code >> 15) & 1) == 1, 0.25, -0.25)


@triton.jit
def _trellis_tile(codes, table, r, c, valid, cols, L: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                  CODE: tl.constexpr, INCREMENT: tl.constexpr):
    """Bitshift trellis: the state of a weight's step is the L-bit window at bit (N - 1 - t) kV of
    its tile's circular stream of 32 k bytes."""
    TILE_BYTES: tl.constexpr = 32 * K
    KV: tl.constexpr = K * V
    N: tl.constexpr = 256 // V
    tile = (r // 16) * (cols // 16) + c // 16
    position = (r % 16) * 16 + c % 16
    step = position // V
    bit = (N - 1 - step) * KV
    base = codes + tile * TILE_BYTES
    b0 = tl.load(base + (bit >> 3) % TILE_BYTES, mask=valid, other=0).to(tl.uint32)
    b1 = tl.load(base + ((bit >> 3) + 1) % TILE_BYTES, mask=valid, other=0).to(tl.uint32)
    b2 = tl.load(base + ((bit >> 3) + 2) % TILE_BYTES, mask=valid, other=0).to(tl.uint32)
    s = ((b0 | (b1 << 8) | (b2 << 16)) >> (bit & 7).to(tl.uint32)) & ((1 << L) - 1)
    if CODE == 0:  # 1MAD
        x = s * 34038481 + INCREMENT
        total = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
        return (total.to(tl.float32) - 510.0) * (1.0 / 147.800537)
    elif CODE == 1:  # 3INST
        x = s * 89226354 + 64248484
        x = (x & 0x8FFF8FFF) ^ 0x3B603B60
        high = (x >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        low = (x & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return (high + low) * (1.0 / 1.244)
    elif CODE == 2:  # HYB: a hash into a 512 x 2 table, bit 15 flips the first value
        h = ((s + 1) * s) & 0xFFFF
        v = position % 2
        value = tl.load(table + ((h >> 6) & 511) * 2 + v, mask=valid, other=0.0)
        return tl.where((v == 0) & (((h >> 15) & 1) == 1), -value, value)
    else:  # LUT: a table of 2^L x V values
        return tl.load(table + s.to(tl.int32) * V + position % V, mask=valid, other=0.0)


@triton.jit
def _tile(r, c, valid, cols, a, b, cc, tables, second, row_bytes, group_size, groups, scale, zero, inverse,
          FAMILY: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr, V: tl.constexpr, CODE: tl.constexpr,
          INCREMENT: tl.constexpr):
    """W[r, c] of any codebook: a, b, cc are the layer's stored tensors in storage order."""
    if FAMILY == 0 or FAMILY == 1:
        return _grid_tile(a, b, cc, r, c, valid, row_bytes, group_size, groups, scale, zero, BITS, FAMILY == 1)
    elif FAMILY == 2:
        return _e8p_values(a, tables, r, c, valid, cols // 8)
    elif FAMILY == 3:  # E8P + the 1-bit E8 codebook
        code2 = tl.load(b + r * (cols // 8) + c // 8, mask=valid, other=0).to(tl.int32)
        w2 = tl.load(second + code2 * 8 + c % 8, mask=valid, other=0.0)
        return _e8p_values(a, tables, r, c, valid, cols // 8) + w2 * inverse
    elif FAMILY == 4:  # E8P + E8P
        return _e8p_values(a, tables, r, c, valid, cols // 8) + _e8p_values(b, tables, r, c, valid, cols // 8) * inverse
    elif FAMILY == 5:
        return _trellis_tile(a, tables, r, c, valid, cols, L, BITS, V, CODE, INCREMENT)
    else:
        return tl.load(a + r * cols + c, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _matvec_kernel(x, y, rows, cols, a, b, cc, tables, second, row_bytes, group_size, groups, scale, zero, inverse,
                   FAMILY: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr, V: tl.constexpr, CODE: tl.constexpr,
                   INCREMENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """y[batch, r] = sum_c W[r, c] x[batch, c] for BM rows per program; grid (row blocks, batch)."""
    r = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
    batch = tl.program_id(1)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for start in range(0, cols, BN):
        c = start + tl.arange(0, BN)[None, :]
        valid = (r < rows) & (c < cols)
        w = _tile(r, c, valid, cols, a, b, cc, tables, second, row_bytes, group_size, groups, scale, zero, inverse,
                  FAMILY, BITS, L, V, CODE, INCREMENT)
        xv = tl.load(x + batch * cols + c, mask=c < cols, other=0.0)
        acc += tl.where(valid, w, 0.0) * xv
    out = tl.sum(acc, axis=1)
    rr = tl.program_id(0) * BM + tl.arange(0, BM)
    tl.store(y + batch * rows + rr, out, mask=rr < rows)


@triton.jit
def _decode_kernel(w, row0, rows_out, rows, cols, a, b, cc, tables, second, row_bytes, group_size, groups, scale,
                   zero, inverse, FAMILY: tl.constexpr, BITS: tl.constexpr, L: tl.constexpr, V: tl.constexpr,
                   CODE: tl.constexpr, INCREMENT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """w[r - row0, c] = W[r, c] for rows [row0, row0 + rows_out)."""
    local = tl.program_id(0) * BM + tl.arange(0, BM)[:, None]
    c = tl.program_id(1) * BN + tl.arange(0, BN)[None, :]
    r = row0 + local
    valid = (local < rows_out) & (c < cols)
    value = _tile(r, c, valid, cols, a, b, cc, tables, second, row_bytes, group_size, groups, scale, zero, inverse,
                  FAMILY, BITS, L, V, CODE, INCREMENT)
    tl.store(w + local * cols + c, value, mask=valid)


# ----------------------------------------------------------------------------------------------
# Launch plans: tensors and constants per codebook


@lru_cache(maxsize=8)
def _lattice_tables(device: torch.device) -> tuple[Tensor, Tensor]:
    return signed_patterns().to(device), e8_one_bit().to(device)


def _launch_arguments(tensors: Sequence[Tensor], codebook, rows: int, cols: int, device: torch.device):
    """(pointers a, b, cc, tables, second), scalars and constexprs for `codebook`."""
    dummy = torch.zeros(1, dtype=torch.float32, device=device)
    a = tensors[0]
    b = tensors[1] if len(tensors) > 1 else dummy
    cc = tensors[2] if len(tensors) > 2 else dummy
    tables, second = dummy, dummy
    row_bytes = group_size = groups = 0
    scale = zero = inverse = 0.0
    bits, L, V, code, increment = codebook.bits, 0, 1, 0, 0
    name = codebook.name
    if name == "scalar":
        family, row_bytes, group_size, groups = GRID, a.shape[1], codebook.group_size, codebook.groups(cols)
    elif name == "uniform":
        family, row_bytes = UNIFORM, a.shape[1]
        scale, zero = codebook.step, codebook.range / codebook.step
    elif name in ("e8p", "rvq"):
        tables, second = _lattice_tables(device)
        family = E8P if name == "e8p" else (RVQ3 if codebook.bits == 3 else RVQ4)
        inverse = 1.0 / codebook.residual_scale if name == "rvq" else 0.0
    elif name == "trellis":
        family, L, V, code = TRELLIS, codebook.L, codebook.values_per_state, _CODES[codebook.code]
        increment = codebook.increment or 0
        if codebook.code == "hyb":
            tables = tensors[1].float().contiguous()
        elif codebook.code.startswith("lut"):
            tables = _default_values(codebook.code, codebook.L).to(device)
    else:
        family = DENSE
    pointers = (a, b, cc, tables, second)
    scalars = (row_bytes, group_size, groups, scale, zero, inverse)
    return pointers, scalars, dict(FAMILY=family, BITS=bits, L=L, V=V, CODE=code, INCREMENT=increment)


def matvec(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """x [..., cols] (float32) @ W^T -> [..., rows], decoding W tile by tile in the kernel."""
    flat = x.reshape(-1, cols).contiguous()
    y = torch.empty(flat.shape[0], rows, device=x.device, dtype=torch.float32)
    pointers, scalars, constants = _launch_arguments([t.contiguous() for t in tensors], codebook, rows, cols, x.device)
    grid = (triton.cdiv(rows, 16), flat.shape[0])
    _matvec_kernel[grid](flat, y, rows, cols, *pointers, *scalars, **constants, BM=16, BN=64)
    return y.reshape(*x.shape[:-1], rows)


def decode_rows(tensors: Sequence[Tensor], codebook, rows: int, cols: int, lo: int, hi: int) -> Tensor:
    """Rows [lo, hi) of W -> float32 [hi - lo, cols] on the tensors' device."""
    device = tensors[0].device
    w = torch.empty(hi - lo, cols, device=device, dtype=torch.float32)
    pointers, scalars, constants = _launch_arguments([t.contiguous() for t in tensors], codebook, rows, cols, device)
    grid = (triton.cdiv(hi - lo, 16), triton.cdiv(cols, 64))
    _decode_kernel[grid](w, lo, hi - lo, rows, cols, *pointers, *scalars, **constants, BM=16, BN=64)
    return w


def tiled_matmul(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """x [..., cols] @ W^T for many rows: decode W a tile of rows at a time, multiply each with cuBLAS."""
    flat = x.reshape(-1, cols)
    block = codebook.row_block
    per_tile = max(block, TILE_WEIGHTS // cols // block * block)
    y = torch.empty(flat.shape[0], rows, device=x.device, dtype=torch.float32)
    for lo in range(0, rows, per_tile):
        hi = min(rows, lo + per_tile)
        y[:, lo:hi] = flat @ decode_rows(tensors, codebook, rows, cols, lo, hi).t()
    return y.reshape(*x.shape[:-1], rows)


# ----------------------------------------------------------------------------------------------
# Hadamard transform: butterflies over the power-of-two part, then the H_K factor


@triton.jit
def _scale_kernel(x, y, pre, n, HAS_PRE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    for start in range(0, n, BLOCK):
        c = start + tl.arange(0, BLOCK)
        v = tl.load(x + row * n + c, mask=c < n, other=0.0)
        if HAS_PRE:
            v = v * tl.load(pre + c, mask=c < n, other=0.0).to(tl.float32)
        tl.store(y + row * n + c, v, mask=c < n)


@triton.jit
def _butterfly_kernel(y, n, h, BLOCK: tl.constexpr):
    """One stage of the Walsh-Hadamard butterfly of span h over every row of y [rows, n], in place."""
    row = tl.program_id(0)
    pair = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = pair < n // 2
    first = (pair // h) * 2 * h + pair % h
    a = tl.load(y + row * n + first, mask=valid, other=0.0)
    b = tl.load(y + row * n + first + h, mask=valid, other=0.0)
    tl.store(y + row * n + first, a + b, mask=valid)
    tl.store(y + row * n + first + h, a - b, mask=valid)


@triton.jit
def _mix_kernel(y, out, hk, post, n, K, p, norm, HAS_POST: tl.constexpr, BLOCK: tl.constexpr):
    """out[row, i p + c] = norm * post * sum_j M[i, j] y[row, j p + c]; grid (rows, K, column blocks)."""
    row = tl.program_id(0)
    i = tl.program_id(1)
    c = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    valid = c < p
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(0, K):
        m = tl.load(hk + i * K + j)
        acc += m * tl.load(y + row * n + j * p + c, mask=valid, other=0.0)
    acc = acc * norm
    if HAS_POST:
        acc = acc * tl.load(post + i * p + c, mask=valid, other=0.0).to(tl.float32)
    tl.store(out + row * n + i * p + c, acc, mask=valid)


@lru_cache(maxsize=64)
def _factor(k: int, transpose: bool, device: torch.device) -> Tensor:
    h = hadamard_matrix(k)
    return (h.t() if transpose else h).contiguous().to(device)


def hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """post ⊙ Had_n^(T if transpose) (pre ⊙ x) for x [..., n] (float32) with n = K 2^k."""
    n = x.shape[-1]
    k = orthogonal_op(n).factor
    p = n // k
    flat = x.reshape(-1, n).contiguous()
    batch = flat.shape[0]
    y = torch.empty_like(flat)
    _scale_kernel[(batch,)](flat, y, pre if pre is not None else flat, n, HAS_PRE=pre is not None, BLOCK=256)
    h = 1
    while h < p:  # spans below p never cross a K-block boundary: one pass covers all K blocks
        _butterfly_kernel[(batch, triton.cdiv(n // 2, 256))](y, n, h, BLOCK=256)
        h *= 2
    out = torch.empty_like(y)
    hk = _factor(k, transpose, x.device)
    _mix_kernel[(batch, k, triton.cdiv(p, 128))](y, out, hk, post if post is not None else y, n, k, p,
                                                   float(n) ** -0.5, HAS_POST=post is not None, BLOCK=128)
    return out.reshape(x.shape)


def _fused_applies(x: Tensor, codebook, rows: int, cols: int) -> bool:
    return x.numel() // cols <= MATVEC_MAX_ROWS and (codebook.name != "dense" or codebook.bits == 16)


def _tiled_applies(x: Tensor, codebook, rows: int, cols: int) -> bool:
    return x.numel() // cols > MATVEC_MAX_ROWS and (codebook.name != "dense" or codebook.bits == 16)


CODEBOOKS = ["scalar", "uniform", "e8p", "rvq", "trellis", "dense"]
register_kernel("triton-fused-matvec", CODEBOOKS, "cuda", _fused_applies, matvec)
register_kernel("triton-tiled-gemm", CODEBOOKS, "cuda", _tiled_applies, tiled_matmul)
register_hadamard("triton-hadamard", "cuda", lambda x: orthogonal_op(x.shape[-1]).factor is not None, hadamard)
