"""A table of 2^b levels per row, fit by weighted 1-D k-means (SqueezeLLM's non-uniform grid).

Raw weights are bell-shaped, so an evenly spaced grid wastes levels on the tails; levels placed by
k-means on the row itself, each weight counted by what its error costs (the Hessian's diagonal for
its column), sit where the weights are. The levels are stored in fp16, 2^b per row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.errors import QuipkitError
from quipkit.layers.packing import pack_bits, packed_length, unpack_bits

KMEANS_STEPS = 30  # Lloyd iterations: the levels move by less than fp16's resolution well before


@register_codebook("table")
class RowTable(Codebook):
    """b-bit codes into a per-row table of 2^b fp16 levels."""

    dim = 1

    def __init__(self, bits: int) -> None:
        if not 1 <= bits <= 4:
            raise QuipkitError(f"the per-row table holds 2^bits levels for 1 to 4 bits, got {bits}")
        super().__init__(bits)
        self.levels = 1 << bits

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}

    def fit(self, weight: Tensor, importance: Tensor | None = None, counted: Tensor | None = None) -> Params:
        """Levels [m, 2^b] by k-means on each row of `weight` [m, n], weight j counted by `importance`
        [n] (None: alike) and not at all where `counted` [m, n] (bool) is False."""
        w = weight.float()
        cost = torch.ones_like(w) if importance is None else importance.float().to(w.device).expand_as(w).clone()
        if counted is not None:
            cost = torch.where(counted, cost, 0.0)
        low = torch.where(cost > 0, w, torch.inf).amin(1, keepdim=True)
        high = torch.where(cost > 0, w, -torch.inf).amax(1, keepdim=True)
        low, high = torch.where(torch.isfinite(low), low, 0.0), torch.where(torch.isfinite(high), high, 0.0)
        # start evenly spaced over the counted weights' range (weighted quantiles would tie on constant rows)
        levels = low + (high - low) * (torch.arange(self.levels, device=w.device) + 0.5) / self.levels
        for _ in range(KMEANS_STEPS):
            nearest = self._nearest(w, levels)
            total = torch.zeros_like(levels).scatter_add_(1, nearest, cost * w)
            mass = torch.zeros_like(levels).scatter_add_(1, nearest, cost)
            levels = torch.where(mass > 0, total / mass.clamp_min(1e-30), levels).sort(1).values
        return {"levels": levels.half().float()}

    @staticmethod
    def _nearest(x: Tensor, levels: Tensor) -> Tensor:
        """Index [m, k] of the level of `levels` [m, L] (ascending) nearest to each of `x` [m, k]."""
        edges = (levels[:, 1:] + levels[:, :-1]) / 2
        return torch.searchsorted(edges.contiguous(), x.contiguous())

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        codes = self._nearest(block.float(), params["levels"])
        return codes.to(torch.int32), params["levels"].gather(1, codes)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return params["levels"].gather(1, codes.long())

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        return {"codes": pack_bits(codes, self.bits), "levels": params["levels"].half()}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        return unpack_bits(stored["codes"], self.bits, cols), {"levels": stored["levels"].float()}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"codes": ((rows, packed_length(cols, self.bits)), torch.uint8),
                "levels": ((rows, self.levels), torch.float16)}
