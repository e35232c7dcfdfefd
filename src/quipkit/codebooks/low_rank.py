"""A low-rank term L R of a layer's weight, each factor stored in a number format of its own (CALDERA).

The term lives where the layer's codes do (after the incoherence transform, in the codes' scale), so
the layer computes transform.output((decode(codes) + L R) x_t). L [m, k] is stored as an m x k
matrix of the factor codebook, R [k, n] as a k x n one; their tensors are the layer's, prefixed.
A factor codebook either scales itself (a grid with per-group scales, bf16) or is a unit-scale code
(QTIP's trellis): then each factor row also stores an fp16 scale, `row_scales`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Params
from quipkit.codebooks.registry import make_codebook
from quipkit.codebooks.scalar import MIN_SCALE
from quipkit.errors import QuipkitError

LEFT, RIGHT = "lr_left_", "lr_right_"
ROW_SCALES = "row_scales"


class LowRank:
    """Rank-`rank` factors L [m, k] and R [k, n] in the factor codebook `codebook` (a spec)."""

    def __init__(self, rank: int, codebook: dict[str, Any]) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise QuipkitError(f"the low-rank term needs a rank >= 1, got {rank!r}")
        self.rank = rank
        self.codebook = make_codebook(codebook)
        self.row_scaled = self.codebook.target_rms is not None  # a unit-scale code: one scale per factor row
        if not self.row_scaled and (self.codebook.dim != 1 or self.codebook.row_block != 1):
            raise QuipkitError(f"low-rank factors need a scalar codebook that scales itself (scalar, dense) or a "
                               f"unit-scale code (trellis), not '{self.codebook.name}'")

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "codebook": self.codebook.spec()}

    def check_shape(self, rows: int, cols: int) -> None:
        if self.rank > min(rows, cols):
            raise QuipkitError(f"rank {self.rank} is larger than a {rows}x{cols} weight allows (at most "
                               f"{min(rows, cols)}); lower --rank")
        step = max(self.codebook.dim, self.codebook.row_block)
        if self.rank % step or rows % self.codebook.row_block or cols % self.codebook.dim:
            raise QuipkitError(f"{self.codebook.name} factors need the rank and the weight's sides in multiples of {step}: "
                               f"rank {self.rank} of a {rows}x{cols} weight does not fit; use a rank that is a "
                               f"multiple of {step}, or --lr-format grid")

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the stored tensors of both factors, under their prefixed names."""
        left, right = self.codebook.storage(rows, self.rank), self.codebook.storage(self.rank, cols)
        if self.row_scaled:
            left, right = {**left, ROW_SCALES: ((rows,), torch.float16)}, {**right, ROW_SCALES: ((self.rank,), torch.float16)}
        return _joined(left, right)

    def scale_rows(self, factor: Tensor) -> tuple[Tensor, Tensor]:
        """For a unit-scale code: `factor` [r, c] -> (row scales [r] as stored, the rows at the code's RMS)."""
        scales = (factor.square().mean(1).sqrt() / self.codebook.target_rms).clamp_min(MIN_SCALE).half().float()
        return scales, factor / scales[:, None]

    def names(self, rows: int, cols: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The stored names of L's tensors and of R's, each in its codebook's storage order (the order the
        decode kernels read them in)."""
        return (tuple(LEFT + k for k in self.codebook.storage(rows, self.rank)),
                tuple(RIGHT + k for k in self.codebook.storage(self.rank, cols)))

    def pack(self, left: tuple[Tensor, Params], right: tuple[Tensor, Params]) -> dict[str, Tensor]:
        """(codes, params) of L and of R -> the stored tensors; a unit-scale code's params hold its
        `row_scales` [r]."""
        return _joined(*(self._packed(*part) for part in (left, right)))

    def _packed(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        stored = self.codebook.pack(codes, params)
        return {**stored, ROW_SCALES: params[ROW_SCALES].half()} if self.row_scaled else stored

    def factors(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """The stored tensors (a layer's, others' ignored) -> (L [rows, k], R [k, cols]), float32."""
        (left, left_params), (right, right_params) = self.unpacked(stored, rows, cols)
        return self.decode(left, left_params), self.decode(right, right_params)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        """One factor's (codes, params) -> its values [r, c], float32, row scales applied."""
        values = self.codebook.decode(codes, params)
        return values * params[ROW_SCALES][:, None] if self.row_scaled else values

    def unpacked(self, stored: dict[str, Tensor], rows: int,
                 cols: int) -> tuple[tuple[Tensor, Params], tuple[Tensor, Params]]:
        """The stored tensors (a layer's, others' ignored) -> (codes, params) of L [rows, k] and of R [k, cols]:
        `pack`'s inverse."""
        left, right = _split(stored)
        return self._unpacked(left, rows, self.rank), self._unpacked(right, self.rank, cols)

    def _unpacked(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        codes, params = self.codebook.unpack(stored, rows, cols)
        return (codes, {**params, ROW_SCALES: stored[ROW_SCALES].float()}) if self.row_scaled else (codes, params)


def _split(stored: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """L's tensors and R's, their prefixes taken off."""
    return tuple({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)} for prefix in (LEFT, RIGHT))


def _joined(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """L's entries and R's under their prefixed names."""
    return {**{LEFT + k: v for k, v in left.items()}, **{RIGHT + k: v for k, v in right.items()}}
