"""Scalar codebooks: the per-group grid of GPTQ/RTN and QuIP's single uniform grid on incoherent weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.errors import QuipkitError
from quipkit.layers.packing import pack_bits, packed_length, unpack_bits

# fp16 cannot hold a smaller normal number; a group whose range is below this is all but zero.
MIN_SCALE = 2.0**-14

# Range factors tried by the clipped grid: min-max wastes low-bit levels on the tails of
# outlier-free (e.g. incoherence-processed) weights, whose best 2-bit range is about half of it.
CLIP_SHRINKS = torch.linspace(1.0, 0.3, 15).tolist()


@register_codebook("scalar")
class GroupGrid(Codebook):
    """Integer grid with one fp16 scale and one integer zero point per row and group of columns.

    Asymmetric (default): the grid spans [min(w, 0), max(w, 0)] of the group, as GPTQ does.
    Symmetric: it spans [-max|w|, max|w|] with the zero point fixed at 2^(bits-1).
    Clip: that range shrunk by the factor (of `CLIP_SHRINKS`) with the least squared error.
    """

    dim = 1

    def __init__(self, bits: int, group_size: int = 128, symmetric: bool = False, clip: bool = False) -> None:
        if not 1 <= bits <= 8:
            raise QuipkitError(f"the scalar codebook supports 1 to 8 bits, got {bits}")
        if group_size < 1:
            raise QuipkitError(f"group_size must be >= 1, got {group_size}")
        super().__init__(bits)
        self.group_size = group_size
        self.symmetric = symmetric
        self.clip = clip
        self.qmax = 2**bits - 1

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "clip": self.clip}

    def groups(self, cols: int) -> int:
        return -(-cols // self.group_size)

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """Per (row, group): the min-max range, or with `clip` the shrunk range of least squared error."""
        rows, cols = weight.shape
        group = torch.arange(cols, device=weight.device) // self.group_size
        shape = (rows, self.groups(cols))
        w = weight.float()
        index = group.expand(rows, cols)
        wmax = torch.zeros(shape, device=w.device).scatter_reduce(1, index, w, "amax", include_self=True)
        wmin = torch.zeros(shape, device=w.device).scatter_reduce(1, index, w, "amin", include_self=True)
        best = self._grid(wmin, wmax)
        if not self.clip:
            return best
        columns = torch.arange(cols, device=w.device)
        best_err = None
        for shrink in CLIP_SHRINKS:
            params = self._grid(wmin * shrink, wmax * shrink)
            err = (self.quantize(w, params, columns)[1] - w).square()
            err = torch.zeros(shape, device=w.device).index_add_(1, group, err)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {k: torch.where(better, params[k], best[k]) for k in best}
        return best

    def _grid(self, wmin: Tensor, wmax: Tensor) -> Params:
        """Scale and zero point [rows, groups] of the grid spanning [wmin, wmax] (both contain 0)."""
        if self.symmetric:
            scale = (2 * torch.maximum(wmax, -wmin) / self.qmax).clamp_min(MIN_SCALE).half().float()
            return {"scale": scale, "zero": torch.full_like(scale, float(2 ** (self.bits - 1)))}
        scale = ((wmax - wmin) / self.qmax).clamp_min(MIN_SCALE).half().float()
        return {"scale": scale, "zero": torch.round(-wmin / scale).clamp(0, self.qmax)}

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        group = cols // self.group_size
        scale, zero = params["scale"][:, group], params["zero"][:, group]
        codes = torch.clamp(torch.round(block / scale) + zero, 0, self.qmax)
        return codes.to(torch.int32), scale * (codes - zero)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        group = torch.arange(codes.shape[1], device=codes.device) // self.group_size
        return params["scale"][:, group] * (codes.float() - params["zero"][:, group])

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        return {
            "codes": pack_bits(codes, self.bits),
            "scales": params["scale"].half(),
            "zeros": pack_bits(params["zero"].to(torch.int32).flatten(), self.bits),  # one stream: no per-row padding
        }

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        groups = self.groups(cols)
        codes = unpack_bits(stored["codes"], self.bits, cols)
        zero = unpack_bits(stored["zeros"], self.bits, rows * groups).reshape(rows, groups).float()
        return codes, {"scale": stored["scales"].float(), "zero": zero}

    def dequantize_rows(self, stored: dict[str, Tensor], rows: int, cols: int, index: Tensor) -> Tensor:
        groups = self.groups(cols)
        codes = unpack_bits(stored["codes"][index], self.bits, cols)
        # zero points of row r sit at positions r * groups + g of one b-bit stream
        position = index.reshape(-1, 1).long() * groups + torch.arange(groups, device=index.device)
        bit = position * self.bits
        byte, shift = bit >> 3, (bit & 7).to(torch.int32)
        stream = torch.nn.functional.pad(stored["zeros"], (0, 1)).to(torch.int32)
        zero = ((stream[byte] | (stream[byte + 1] << 8)) >> shift) & self.qmax
        params = {"scale": stored["scales"][index].float(), "zero": zero.float()}
        return self.decode(codes, params)

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        groups = self.groups(cols)
        return {
            "codes": ((rows, packed_length(cols, self.bits)), torch.uint8),
            "scales": ((rows, groups), torch.float16),
            "zeros": ((packed_length(rows * groups, self.bits),), torch.uint8),
        }


# Half-range of QuIP's uniform grid in units of the weights' RMS, per bit width. Tuned by
# bench/tune_codebooks.py on i.i.d. Gaussian data (the distribution incoherent weights approach).
UNIFORM_RANGE = {2: 1.5, 3: 2.05, 4: 2.5, 8: 4.5}


@register_codebook("uniform")
class UniformGrid(Codebook):
    """QuIP's grid: 2^bits levels uniform on [-range, range], one scale per matrix (the transform's).

    Meant for incoherence-processed weights normalised to unit RMS.
    """

    dim = 1
    target_rms = 1.0

    def __init__(self, bits: int, range: float | None = None) -> None:
        if bits not in UNIFORM_RANGE:
            raise QuipkitError(f"the uniform codebook supports {sorted(UNIFORM_RANGE)} bits, got {bits}")
        super().__init__(bits)
        self.range = float(range if range is not None else UNIFORM_RANGE[bits])
        self.qmax = 2**bits - 1
        self.step = 2 * self.range / self.qmax

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "range": self.range}

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        codes = torch.clamp(torch.round((block + self.range) / self.step), 0, self.qmax)
        return codes.to(torch.int32), codes * self.step - self.range

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return codes.float() * self.step - self.range

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        return {"codes": pack_bits(codes, self.bits)}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        return unpack_bits(stored["codes"], self.bits, cols), {}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"codes": ((rows, packed_length(cols, self.bits)), torch.uint8)}
