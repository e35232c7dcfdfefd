"""QTIP's bitshift trellis codes: 16 x 16 weight tiles coded as walks over 2^L states, k bits per weight.

A tile (flattened row by row, T = 256 weights) is N = T / V steps; each step shifts kV new bits into
an L-bit state, s' = ((s << kV) mod 2^L) | b, and state s decodes to V values c(s). The bitstream
is circular (tail-biting): the state before step 0 is made of the stream's last bits, so a tile
stores exactly k * T bits. Encoding is Viterbi (compiled C on the CPU, the torch version below on
GPUs and as its test oracle); decoding rebuilds each state from the circular stream.

Stored layout (checkpoint format 2): each tile's N chunks of kV bits are packed last-to-first into
a little-endian bit stream, so the state of step t is the L-bit window starting at bit
(N - 1 - t) kV (wrapping around): a decode kernel reads it with one load and one shift. Format 1
packed the chunks first-to-last; `upgrade` converts such checkpoints on load.

Codes c(s), all computed from s (no table to store) except HYB's small 512 x 2 table:
  1MAD (V=1):  x = (s * 34038481 + increment) mod 2^32; (sum of x's 4 bytes - 510) / 147.800537;
               QTIP's increment is 76625530 (a spec without one means it); quipkit's models use
               76611584, the same with its low 16 bits cleared (see ONE_MAD_INCREMENT)
  3INST (V=1): x = (s * 89226354 + 64248484) mod 2^32; x = (x & 0x8FFF8FFF) ^ 0x3B603B60;
               fp16(high half) + fp16(low half), divided by its standard deviation 1.244
  HYB (V=2):   h = (s + 1) * s mod 2^16; table[bits 6..14 of h]; bit 15 flips the first value's sign
  LUT (V=1,2): a seeded Gaussian table of 2^L x V values (the unstructured reference point)
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quipkit import native
from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.errors import QuipkitError
from quipkit.layers.packing import pack_bits, packed_length, unpack_bits

TILE = 16  # tiles are TILE x TILE weights
T = TILE * TILE
CODES = {"1mad": 1, "3inst": 1, "hyb": 2, "lut": 1, "lut2": 2}  # name -> values per state (V)
# Data RMS relative to each code's scale that minimises Gaussian MSE (bench/tune_codebooks.py).
CODE_RMS = {"1mad": 0.98, "3inst": 0.98, "hyb": 1.04, "lut": 1.0, "lut2": 1.0}
_3INST_STD = 1.244
_1MAD_STD = 147.800537
ONE_MAD_MULTIPLIER = 34038481
QTIP_INCREMENT = 76625530
# QTIP's increment with its low 16 bits cleared. Then the increment is a times c, c = increment / a
# mod 2^32, with c's low 16 bits zero as well, so for L <= 16 a s + increment = a (s | c): an AVX-512
# kernel forms s | c with the state's mask in one ternary-logic instruction and drops an add per 16
# weights (1MAD int8 at 4096 x 4096: 805 -> about 670 us). Trellis-quantized Gaussian MSE at 2 bits, 4000
# tiles: L = 12 0.07446 (QTIP's 0.07436), L = 16 0.06883 (0.06883).
ONE_MAD_INCREMENT = QTIP_INCREMENT & 0xFFFF0000
HYB_ENTRIES = 512


def _lcg(states: np.ndarray, a: int, b: int) -> np.ndarray:
    return (states.astype(np.uint64) * np.uint64(a) + np.uint64(b)) & np.uint64(0xFFFFFFFF)


def _code_1mad(states: np.ndarray, increment: int) -> np.ndarray:
    x = _lcg(states, ONE_MAD_MULTIPLIER, increment)
    total = sum((x >> np.uint64(8 * i)) & np.uint64(0xFF) for i in range(4)).astype(np.float64)
    return ((total - 510.0) / _1MAD_STD)[:, None]


def _code_3inst(states: np.ndarray) -> np.ndarray:
    x = _lcg(states, 89226354, 64248484)
    x = (x & np.uint64(0x8FFF8FFF)) ^ np.uint64(0x3B603B60)
    high = (x >> np.uint64(16)).astype(np.uint16).view(np.float16).astype(np.float64)
    low = (x & np.uint64(0xFFFF)).astype(np.uint16).view(np.float16).astype(np.float64)
    return ((high + low) / _3INST_STD)[:, None]


@lru_cache(maxsize=4)
def hyb_table(seed: int = 0) -> Tensor:
    """The 512 x 2 HYB table: k-means (Lloyd, 25 iterations) of 2-D Gaussian samples, seeded."""
    gen = torch.Generator().manual_seed(seed)
    samples = torch.randn(1 << 17, 2, generator=gen, dtype=torch.float64)
    # HYB's sign bit mirrors the first coordinate, so the table codes the half-plane x0 >= 0
    samples[:, 0] = samples[:, 0].abs()
    centers = samples[torch.randperm(len(samples), generator=gen)[:HYB_ENTRIES]].clone()
    for _ in range(25):
        assign = torch.cdist(samples, centers).argmin(1)
        sums = torch.zeros_like(centers).index_add_(0, assign, samples)
        counts = torch.bincount(assign, minlength=HYB_ENTRIES).clamp_min(1).unsqueeze(1)
        centers = sums / counts
    return centers.half().float()  # fp16-exact, as the checkpoint stores it


def _code_hyb(states: np.ndarray, table: Tensor) -> np.ndarray:
    h = ((states.astype(np.uint64) + np.uint64(1)) * states.astype(np.uint64)) & np.uint64(0xFFFF)
    index = ((h >> np.uint64(6)) & np.uint64(HYB_ENTRIES - 1)).astype(np.int64)
    values = table.double().numpy()[index].copy()
    flip = ((h >> np.uint64(15)) & np.uint64(1)).astype(bool)
    values[flip, 0] = -values[flip, 0]
    return values


def _code_lut(states: np.ndarray, values_per_state: int, L: int) -> np.ndarray:
    gen = torch.Generator().manual_seed(1000 + L)
    return torch.randn(1 << L, values_per_state, generator=gen, dtype=torch.float64).numpy()[states]


def code_values(code: str, L: int, hyb: Tensor | None = None, increment: int = QTIP_INCREMENT) -> Tensor:
    """c(s) for every state: [2^L, V] (float32); `increment` is 1MAD's."""
    states = np.arange(1 << L, dtype=np.uint64)
    if code == "1mad":
        values = _code_1mad(states, increment)
    elif code == "3inst":
        values = _code_3inst(states)
    elif code == "hyb":
        values = _code_hyb(states, hyb if hyb is not None else hyb_table())
    else:
        values = _code_lut(states.astype(np.int64), CODES[code], L)
    return torch.from_numpy(values.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Viterbi: the torch version (GPU path and reference), same semantics as _native/viterbi.c.


def _distances(x: Tensor, table: Tensor) -> Tensor:
    """||x_b - c(s)||^2 for one step: x [B, V], table [S, V] -> [B, S]."""
    if table.shape[1] == 1:
        return (x[:, :1] - table[:, 0]).square()
    return (x[:, None, :] - table[None]).square().sum(-1)


def _viterbi_pass(x: Tensor, table: Tensor, L: int, kv: int, fixed: Tensor | None) -> tuple[Tensor, Tensor]:
    """One pass over x [B, N, V]; fixed [B] constrains start high bits and end low bits. -> (states, cost)."""
    batch, steps, _ = x.shape
    states_count, p = 1 << L, 1 << kv
    r = states_count >> kv
    all_states = torch.arange(states_count, device=x.device)
    cost = _distances(x[:, 0], table)  # [B, S]
    if fixed is not None:
        cost = torch.where((all_states[None] >> kv) == fixed[:, None], cost, torch.inf)
    back = torch.empty(batch, steps, r, dtype=torch.uint8, device=x.device)
    for step in range(1, steps):
        best, arg = cost.view(batch, p, r).min(dim=1)  # over the high bits h of the predecessor
        back[:, step] = arg
        cost = (_distances(x[:, step], table).view(batch, r, p) + best[:, :, None]).view(batch, states_count)
    if fixed is not None:
        cost = torch.where((all_states[None] & (r - 1)) == fixed[:, None], cost, torch.inf)
    total, state = cost.min(dim=1)
    states = torch.empty(batch, steps, dtype=torch.int64, device=x.device)
    rows = torch.arange(batch, device=x.device)
    for step in range(steps - 1, -1, -1):
        states[:, step] = state
        if step:
            low = state >> kv
            state = (back[rows, step, low].long() << (L - kv)) | low
    return states, total


def viterbi_torch(x: Tensor, table: Tensor, L: int, k: int) -> tuple[Tensor, Tensor]:
    """Tail-biting Viterbi of x [B, T] -> (states [B, T / V] int64, cost [B])."""
    v = table.shape[1]
    kv = k * v
    seq = x.float().reshape(x.shape[0], -1, v)
    steps = seq.shape[1]
    half = steps // 2
    table = table.to(x.device)
    rotated, _ = _viterbi_pass(torch.roll(seq, -half, dims=1), table, L, kv, None)
    fixed = rotated[:, steps - half - 1] & ((1 << (L - kv)) - 1)
    return _viterbi_pass(seq, table, L, kv, fixed)


def trellis_encode(x: Tensor, table: Tensor, L: int, k: int, memory: int = 1 << 30) -> tuple[Tensor, Tensor]:
    """States [B, T / V] (int64) and costs [B] of the tail-biting walks for tiles x [B, T].

    The torch path takes as many tiles at once as fit their back-pointers in `memory` bytes: a GPU
    needs large batches to hide the per-step launches.
    """
    if x.device.type == "cpu" and native.available():
        states, cost = native.trellis_encode(x, table, L, k)
        return states.long(), cost
    v = table.shape[1]
    back_bytes = x.shape[1] // v << (L - k * v)
    parts = [viterbi_torch(part, table, L, k) for part in x.split(max(1, memory // back_bytes))]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def states_from_chunks(chunks: Tensor, L: int, kv: int) -> Tensor:
    """Rebuild each step's state from the circular stream of kV-bit chunks [..., N] -> [..., N]."""
    state = torch.zeros_like(chunks)
    for back in range(-(-L // kv)):
        state |= torch.roll(chunks, back, dims=-1) << (back * kv)
    return state & ((1 << L) - 1)


@register_codebook("trellis")
class BitshiftTrellis(Codebook):
    """k bits per weight in 16 x 16 tiles: rows and columns both come in blocks of 16."""

    dim = TILE
    row_block = TILE

    def __init__(
        self, bits: int = 2, L: int = 16, code: str = "1mad", rms: float | None = None, increment: int | None = None
    ) -> None:
        if code not in CODES:
            raise QuipkitError(f"unknown trellis code '{code}'; choose one of {', '.join(CODES)}")
        if not 1 <= bits <= 4:
            raise QuipkitError(f"the trellis supports 1 to 4 bits per weight, got {bits}")
        if not 8 <= L <= 16:
            raise QuipkitError(f"the trellis state size L must be 8 to 16, got {L}")
        v = CODES[code]
        if code == "hyb" and L != 16:
            raise QuipkitError("the HYB code is defined for L = 16")
        if bits * v >= L:
            raise QuipkitError(f"L = {L} is too small for {bits} bits x {v} values per step; use L > {bits * v}")
        if increment is not None and (code != "1mad" or not 0 <= increment < 1 << 32):
            raise QuipkitError(f"increment {increment} is 1MAD's LCG constant: give it with code '1mad', in 0 .. 2^32 - 1")
        super().__init__(bits)
        self.L, self.code, self.values_per_state = L, code, v
        # a spec without an increment (every checkpoint before it was a parameter) means QTIP's
        self.increment = (QTIP_INCREMENT if increment is None else int(increment)) if code == "1mad" else None
        self.kv = bits * v
        self.steps = T // v
        self.rms = float(rms if rms is not None else CODE_RMS[code])
        self.target_rms = self.rms

    def spec(self) -> dict[str, Any]:
        spec = {"name": self.name, "bits": self.bits, "L": self.L, "code": self.code, "rms": self.rms}
        return spec if self.increment is None else {**spec, "increment": self.increment}

    def table(self, device: torch.device, hyb: Tensor | None = None) -> Tensor:
        """c(s) [2^L, V] on `device` (HYB from the given table, else the default one)."""
        if hyb is not None:
            return code_values(self.code, self.L, hyb.float().cpu()).to(device)
        increment = QTIP_INCREMENT if self.increment is None else self.increment  # None: not 1MAD, unused
        return _default_values(self.code, self.L, increment).to(device)

    def _tiles(self, block: Tensor) -> Tensor:
        """[m, w] -> [m / 16 * w / 16, 256], tile (i, j) flattened row by row."""
        m, w = block.shape
        return block.reshape(m // TILE, TILE, w // TILE, TILE).permute(0, 2, 1, 3).reshape(-1, T)

    def _untile(self, tiles: Tensor, m: int, w: int) -> Tensor:
        return tiles.reshape(m // TILE, w // TILE, TILE, TILE).permute(0, 2, 1, 3).reshape(m, w)

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        m, w = block.shape
        table = self.table(block.device, params.get("hyb"))
        states, _ = trellis_encode(self._tiles(block.float()), table, self.L, self.bits)
        values = table[states].reshape(-1, T)
        chunks = (states & ((1 << self.kv) - 1)).to(torch.int32)
        return chunks.reshape(m // TILE, w // TILE, self.steps), self._untile(values, m, w)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        tiles_m, tiles_n, _ = codes.shape
        states = states_from_chunks(codes.long(), self.L, self.kv)
        values = self.table(codes.device, params.get("hyb"))[states].reshape(-1, T)
        return self._untile(values, tiles_m * TILE, tiles_n * TILE)

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        return {}

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        out = {"codes": pack_bits(codes.flip(-1), self.kv)}
        if self.code == "hyb":
            out["hyb"] = hyb_table().half()
        return out

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        codes = unpack_bits(stored["codes"], self.kv, self.steps).flip(-1)
        params = {"hyb": stored["hyb"].float()} if self.code == "hyb" else {}
        return codes, params

    def upgrade(self, stored: dict[str, Tensor], version: int) -> dict[str, Tensor]:
        if version >= 2:
            return stored
        chunks = unpack_bits(stored["codes"], self.kv, self.steps)  # format 1: first-to-last
        return {**stored, "codes": pack_bits(chunks.flip(-1), self.kv)}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {"codes": ((rows // TILE, cols // TILE, packed_length(self.steps, self.kv)), torch.uint8)}
        if self.code == "hyb":
            out["hyb"] = ((HYB_ENTRIES, 2), torch.float16)
        return out


@lru_cache(maxsize=16)
def _default_values(code: str, L: int, increment: int = QTIP_INCREMENT) -> Tensor:
    return code_values(code, L, increment=increment)
