"""Residual vector quantization for 3 and 4 bits: E8P, then a second codebook on the scaled residual.

`x ≈ q1 + q2 / r` with `q1` one of the two E8P points nearest x and `q2 = C2((x - q1) r)`. At 3 bits C2 is the 1-bit E8
codebook: the 241 points of E8 with norm^2 <= 2 and 15 of the 16 points ±2 e_i (one 8-bit code per
8 weights). At 4 bits C2 is E8P again. Because E8P's cells are round, the residual is ball-shaped
and a lattice codebook suits it too. The data scale and `r` are tuned by bench/tune_rvq.py.
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.e8p import as_int16, codeword_table, e8p_nearest, e8p_two_nearest
from quipkit.codebooks.registry import register_codebook

# (data RMS in E8P units, residual scale r) per bit width; from bench/tune_rvq.py (Gaussian MSE).
RVQ_SCALES = {3: (1.0, 1.75), 4: (0.9, 3.7)}


@lru_cache(maxsize=1)
def e8_one_bit() -> Tensor:
    """The 256 points [256, 8] of the 1-bit E8 codebook, in a fixed order."""
    points = [tuple([0.0] * 8)]
    for i, j in itertools.combinations(range(8), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            p = [0.0] * 8
            p[i], p[j] = si, sj
            points.append(tuple(p))
    for signs in itertools.product((0.5, -0.5), repeat=8):
        if sum(s < 0 for s in signs) % 2 == 0:
            points.append(signs)
    for i in range(8):
        for s in (2.0, -2.0):
            if (i, s) != (7, -2.0):
                p = [0.0] * 8
                p[i] = s
                points.append(tuple(p))
    assert len(points) == 256
    return torch.tensor(points, dtype=torch.float32)


@lru_cache(maxsize=8)
def _one_bit_on(device: torch.device) -> tuple[Tensor, Tensor]:
    points = e8_one_bit().to(device)
    return points, points.square().sum(1)


def one_bit_nearest(x: Tensor, chunk: int = 65536) -> tuple[Tensor, Tensor]:
    """Nearest 1-bit E8 point of each row of x [N, 8] -> (codes [N] int32, values [N, 8])."""
    points, norms = _one_bit_on(x.device)
    codes = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].float()
        codes[start : start + chunk] = (norms - 2 * part @ points.t()).argmin(1).to(torch.int32)
    return codes, points[codes.long()]


@register_codebook("rvq")
class ResidualE8(Codebook):
    """3 bits (E8P + 1-bit E8) or 4 bits (E8P + E8P) per weight, 8 weights per code pair."""

    dim = 8

    def __init__(self, bits: int = 4, rms: float | None = None, residual_scale: float | None = None) -> None:
        if bits not in RVQ_SCALES:
            raise ValueError(f"RVQ supports {sorted(RVQ_SCALES)} bits (use 'e8p' for 2), got {bits}")
        super().__init__(bits)
        default_rms, default_r = RVQ_SCALES[bits]
        self.rms = float(rms if rms is not None else default_rms)
        self.residual_scale = float(residual_scale if residual_scale is not None else default_r)
        self.target_rms = self.rms

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "rms": self.rms, "residual_scale": self.residual_scale}

    def _second(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return one_bit_nearest(x) if self.bits == 3 else e8p_nearest(x)

    def _second_table(self, device: torch.device) -> Tensor:
        return _one_bit_on(device)[0] if self.bits == 3 else codeword_table().to(device)

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Tries the two nearest E8P points as first stage and keeps the pair with the smaller error:
        the nearest first stage often leaves a residual the second codebook covers badly."""
        m, width = block.shape
        x = block.reshape(-1, 8).float()
        table = codeword_table().to(x.device)
        best = None
        for first in e8p_two_nearest(x).unbind(1):
            q1 = table[first.long()]
            second, q2 = self._second((x - q1) * self.residual_scale)
            value = q1 + q2 / self.residual_scale
            err = (value - x).square().sum(1)
            if best is None:
                best = (err, first, second, value)
                continue
            better = err < best[0]
            best = (
                torch.where(better, err, best[0]),
                torch.where(better, first, best[1]),
                torch.where(better, second, best[2]),
                torch.where(better[:, None], value, best[3]),
            )
        _, first, second, value = best
        codes = torch.stack((first, second), dim=1).reshape(m, width // 8, 2)
        return codes, value.reshape(m, width)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        m = codes.shape[0]
        q1 = codeword_table().to(codes.device)[codes[..., 0].long() & 0xFFFF]
        q2 = self._second_table(codes.device)[codes[..., 1].long() & 0xFFFF]
        return (q1 + q2 / self.residual_scale).reshape(m, -1)

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        second = codes[..., 1].to(torch.uint8) if self.bits == 3 else as_int16(codes[..., 1])
        return {"codes": as_int16(codes[..., 0]), "codes2": second.contiguous()}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        first = stored["codes"].to(torch.int32) & 0xFFFF
        second = stored["codes2"].to(torch.int32) & 0xFFFF
        return torch.stack((first, second), dim=-1), {}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        second = torch.uint8 if self.bits == 3 else torch.int16
        return {"codes": ((rows, cols // 8), torch.int16), "codes2": ((rows, cols // 8), second)}
