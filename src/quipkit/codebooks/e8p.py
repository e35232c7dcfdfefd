"""E8P, QuIP#'s 2-bit lattice codebook: 65,536 points of the shifted E8 lattice, 8 weights per 16-bit code.

`D8^ = {x in (Z + 1/2)^8 : sum(x) even}` and `E8 + 1/4 = (D8^ - 1/4) ∪ (D8^ + 1/4)`. The source set
S holds 256 absolute-value patterns: the 227 distinct |d| of d in D8^ with ||d||^2 <= 10, plus 29 of
the 56 patterns of norm^2 12 (five 3/2 and three 1/2). The codebook is
`{s ⊙ a ± 1/4 : a in S, s ⊙ a in D8^}`: 128 valid sign patterns per a (flipping one sign flips the
parity of the sum) times two shifts.

Code layout (16 bits): bits 0-7 index S, bits 8-14 are the signs of coordinates 0-6 (1 = negative),
bit 15 is the shift (1 = +1/4). The sign of coordinate 7 is implied by the parity. Decoding is a
table lookup; exact nearest search folds the signs and needs 256 candidates per shift, not 65,536.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from quipkit import native
from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook

CODES = 1 << 16
# Best RMS of the data relative to the codebook for i.i.d. Gaussian input: bench/distortion.py.
E8P_GAUSSIAN_RMS = 1.03


def _norm12_patterns() -> list[tuple[float, ...]]:
    """29 of the 56 patterns (five 3/2, three 1/2), chosen to balance how often each coordinate is 1/2.

    Greedy over the 3-subsets (positions of the 1/2 entries) in lexicographic order: repeatedly take
    the first subset that keeps the largest per-coordinate count smallest. Gaussian weights are
    exchangeable, so any balanced choice is as good as another; this one is deterministic.
    """
    subsets = list(itertools.combinations(range(8), 3))
    counts = [0] * 8
    chosen: list[tuple[int, ...]] = []
    while len(chosen) < 29:
        best = min(
            (s for s in subsets if s not in chosen),
            key=lambda s: (max(counts[i] + (i in s) for i in range(8)), sum(counts[i] for i in s)),
        )
        chosen.append(best)
        for i in best:
            counts[i] += 1
    return [tuple(0.5 if i in s else 1.5 for i in range(8)) for s in sorted(chosen)]


@lru_cache(maxsize=1)
def source_set() -> Tensor:
    """S [256, 8] (float32): absolute-value patterns, sorted by norm then lexicographically, then the 29 extras."""
    values = (0.5, 1.5, 2.5)
    small = {
        p
        for p in itertools.product(values, repeat=8)
        if sum(v * v for v in p) <= 10
    }
    ordered = sorted(small, key=lambda p: (sum(v * v for v in p), p))
    patterns = ordered + _norm12_patterns()
    assert len(ordered) == 227 and len(patterns) == 256
    return torch.tensor(patterns, dtype=torch.float32)


@lru_cache(maxsize=1)
def codeword_table() -> Tensor:
    """All 65,536 codewords [65536, 8] (float32), indexed by code."""
    s = source_set()
    codes = torch.arange(CODES)
    idx = codes & 0xFF
    sign_bits = (codes[:, None] >> (8 + torch.arange(7))) & 1  # [C, 7]
    shift = torch.where((codes >> 15) & 1 == 1, 0.25, -0.25)
    a = s[idx]  # [C, 8]
    signs = 1.0 - 2.0 * sign_bits.float()
    partial = (signs * a[:, :7]).sum(1)  # sum of the first 7 signed entries
    # last sign makes the total even: total = partial ± a7
    last = torch.where(torch.remainder(partial + a[:, 7], 2.0) == 0, 1.0, -1.0)
    signed = torch.cat([signs, last[:, None]], dim=1) * a
    return signed + shift[:, None]


@lru_cache(maxsize=1)
def pattern_parity() -> Tensor:
    """Parity [256] (uint8) of each pattern's coordinate sum (an integer: 8 half-integers)."""
    return (source_set().sum(1).round().to(torch.int64) % 2).to(torch.uint8)


@lru_cache(maxsize=1)
def signed_patterns() -> Tensor:
    """The patterns with coordinate 7's sign resolved, [512, 8] (float32), for decode kernels.

    A code's 8th sign makes its number of negative coordinates match the pattern's parity, so it is
    negative iff (parity of the 7 stored signs) xor (pattern parity). Row i + 256 q holds pattern i
    for a code whose 7 signs have parity q; the 7 stored signs then apply to coordinates 0-6 only."""
    parity = pattern_parity()
    signed = source_set().repeat(2, 1)
    signed[torch.cat([parity, 1 - parity]).bool(), 7] *= -1
    return signed.contiguous()


@lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(S [256, 8], |S|^2 [256], 2S [256, 8], codewords [65536, 8], pattern key -> S index [4^8]) on `device`.

    A pattern's key is sum_i (a_i - 1/2) * 4^i; keys of patterns outside S map to -1.
    """
    s = source_set()
    keys = ((s - 0.5).round().to(torch.int64) * (4 ** torch.arange(8))).sum(1)
    lookup = torch.full((4**8,), -1, dtype=torch.int64)
    lookup[keys] = torch.arange(256)
    return (
        s.to(device),
        s.square().sum(1).to(device),
        (2 * s).to(device),
        codeword_table().to(device),
        lookup.to(device),
    )


def e8p_nearest(x: Tensor, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """Exact nearest E8P codeword of each row of x [N, 8] -> (codes [N] int32, values [N, 8]).

    On the CPU the compiled search runs when it was built; elsewhere (and as its test oracle) torch.
    """
    s, _, _, table, lookup = _tables(x.device)
    if x.device.type == "cpu" and native.available():
        codes = native.e8p_nearest(x, s, lookup)
        return codes, table[codes.long()]
    return e8p_nearest_torch(x, chunk)


def e8p_nearest_torch(x: Tensor, chunk: int = 16384) -> tuple[Tensor, Tensor]:
    """The vectorised torch search (GPU path, and the reference for the compiled one)."""
    table = _tables(x.device)[3]
    codes = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        codes[start : start + chunk] = _nearest_chunk(x[start : start + chunk].float())
    return codes, table[codes.long()]


def e8p_two_nearest(x: Tensor, chunk: int = 4096) -> Tensor:
    """Codes [N, 2] (int32) of the nearest and second-nearest E8P codewords to each row of x [N, 8]."""
    s = _tables(x.device)[0]
    if x.device.type == "cpu" and native.available():
        return native.e8p_two_nearest(x, s)
    return torch.cat([_two_nearest_chunk(part.float()) for part in x.split(chunk)])


def _two_nearest_chunk(x: Tensor) -> Tensor:
    """Torch version: every pattern's best and runner-up sign choice in both cosets, then the top two."""
    s, s_norm, s2, _, _ = _tables(x.device)
    dists, codes = [], []
    bits = 1 << torch.arange(8, device=x.device)
    for shift_bit, shift in ((0, -0.25), (1, 0.25)):
        y = x - shift
        ya = y.abs()
        neg = (y < 0).to(torch.int64)
        base = ya.square().sum(1, keepdim=True) - 2 * ya @ s.t() + s_norm  # [B, 256]
        odd = torch.remainder(s2.sum(1) - 2 * (neg.float() @ s2.t()), 4.0) != 0
        cost, at = (ya.unsqueeze(1) * s.unsqueeze(0)).topk(2, dim=2, largest=False)  # [B, 256, 2]
        negmask = (neg * bits).sum(1, keepdim=True)  # [B, 1]
        flip1, flip2 = bits[at[..., 0]], bits[at[..., 1]]
        best = torch.where(odd, base + 4 * cost[..., 0], base)
        best_mask = torch.where(odd, negmask ^ flip1, negmask)
        second = torch.where(odd, base + 4 * cost[..., 1], base + 4 * cost.sum(-1))
        second_mask = torch.where(odd, negmask ^ flip2, negmask ^ flip1 ^ flip2)
        index = torch.arange(256, device=x.device).expand_as(base)
        for dist, mask in ((best, best_mask), (second, second_mask)):
            dists.append(dist)
            codes.append(index | ((mask & 0x7F) << 8) | (shift_bit << 15))
    dist, code = torch.cat(dists, 1), torch.cat(codes, 1)
    top = dist.topk(2, dim=1, largest=False).indices
    return code.gather(1, top).to(torch.int32)


def _encode(signed: Tensor, index: Tensor, shift_bit: int) -> Tensor:
    """Code of the point s ⊙ S[index] ± 1/4 from its signed pattern [B, 8]."""
    bits = ((signed[:, :7] < 0).to(torch.int32) << torch.arange(8, 15, device=signed.device, dtype=torch.int32)).sum(1)
    return index.to(torch.int32) | bits | (shift_bit << 15)


def _nearest_lattice(y: Tensor) -> Tensor:
    """Nearest point of D8^ (half-integers, even sum) to each row of y [B, 8] (Conway-Sloane decoder)."""
    r = torch.floor(y) + 0.5
    err = y - r
    odd = torch.remainder(r.sum(1), 2.0) != 0
    worst = err.abs().argmax(1)
    step = torch.where(err.gather(1, worst[:, None])[:, 0] >= 0, 1.0, -1.0)
    rows = torch.nonzero(odd)[:, 0]
    r[rows, worst[rows]] += step[rows]
    return r


def _search_coset(y: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest s ⊙ a (a in S, s ⊙ a in D8^) to each row of y [B, 8] -> (squared distance [B], code part).

    Most rows' nearest lattice point already lies in S; the rest compare all 256 patterns with the
    signs of y, charging an odd-parity pattern the cheapest sign flip, 4 min_i |y_i| a_i.
    """
    s, s_norm, s2, _, lookup = _tables(y.device)
    point = _nearest_lattice(y)
    pattern = point.abs()
    digits = (pattern - 0.5).round().to(torch.int64)
    keys = (digits.clamp(max=3) * (4 ** torch.arange(8, device=y.device))).sum(1)
    index = torch.where(digits.max(1).values <= 3, lookup[keys], -1)
    dist = (y - point).square().sum(1)
    signed = point
    far = torch.nonzero(index < 0)[:, 0]
    if far.numel():
        yf = y[far]
        ya = yf.abs()
        neg = yf < 0
        base = ya.square().sum(1, keepdim=True) - 2 * ya @ s.t() + s_norm  # [F, 256]
        # parity of sum(sign(y) ⊙ a), in halves: sum(2a) - 2 sum_{neg}(2a) must be 0 mod 4
        odd = torch.remainder(s2.sum(1) - 2 * (neg.float() @ s2.t()), 4.0) != 0  # small integers: exact
        flip_cost, flip_at = (ya.unsqueeze(1) * s.unsqueeze(0)).min(dim=2)
        best, choice = (base + odd * 4 * flip_cost).min(dim=1)
        signs = torch.where(neg, -1.0, 1.0)
        needs_flip = torch.nonzero(odd.gather(1, choice[:, None])[:, 0])[:, 0]
        at = flip_at.gather(1, choice[:, None])[:, 0]
        signs[needs_flip, at[needs_flip]] *= -1
        signed = signed.clone()
        signed[far] = signs * s[choice]
        index = index.clone()
        index[far] = choice
        dist = dist.clone()
        dist[far] = best
    return dist, signed, index


def _nearest_chunk(x: Tensor) -> Tensor:
    dist_lo, signed_lo, index_lo = _search_coset(x + 0.25)
    dist_hi, signed_hi, index_hi = _search_coset(x - 0.25)
    code_lo = _encode(signed_lo, index_lo, 0)
    code_hi = _encode(signed_hi, index_hi, 1)
    return torch.where(dist_hi < dist_lo, code_hi, code_lo)


def as_int16(codes: Tensor) -> Tensor:
    """16-bit codes (ints in [0, 65536)) stored as int16, two's complement; `& 0xFFFF` undoes it."""
    wide = codes.to(torch.int32)
    return torch.where(wide >= 1 << 15, wide - (1 << 16), wide).to(torch.int16)


@register_codebook("e8p")
class E8P(Codebook):
    """2 bits per weight: each row's 8 consecutive weights share one 16-bit code."""

    dim = 8

    def __init__(self, bits: int = 2, rms: float = E8P_GAUSSIAN_RMS) -> None:
        if bits != 2:
            raise ValueError("E8P stores exactly 2 bits per weight; use 'rvq' for 3 and 4 bits")
        super().__init__(bits)
        self.rms = float(rms)
        self.target_rms = self.rms

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "rms": self.rms}

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        m, width = block.shape
        codes, values = e8p_nearest(block.reshape(-1, 8))
        return codes.reshape(m, width // 8), values.reshape(m, width)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        table = _tables(codes.device)[3]
        m = codes.shape[0]
        return table[codes.long() & 0xFFFF].reshape(m, -1)

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        return {"codes": as_int16(codes)}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        return stored["codes"].to(torch.int32) & 0xFFFF, {}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"codes": ((rows, cols // 8), torch.int16)}
