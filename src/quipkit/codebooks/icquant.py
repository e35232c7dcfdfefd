"""ICQuant: each row's largest weights get a grid of their own, and their positions an index code.

In a weight row the few largest magnitudes (the outliers, a `ratio` of the row: 5% by default) span
about half its range, so one grid over the whole row spends a bit on them. Here the inliers get a
b-bit grid over their own, narrower range (the scalar grid: one group per row, or `group_size`
columns as GPTQ's; its range searched with `clip`), and the outliers a b-bit sign-and-magnitude grid
over theirs, one per row: a sign bit and 2^(b-1) evenly spaced magnitudes, fitted to the row's
outlier magnitudes by Lloyd's alternation (each counted by its column's Hessian diagonal). Every
weight keeps one b-bit code; which grid it reads is the outlier mask, stored as the gap code of
`outlier_positions` (its first byte the symbol width, chosen per matrix). The mask is fixed by
`fit`, before rounding, so LDLQ rounds each weight on its class's grid through the Hessian as usual.
`saliency="hessian"` picks each row's outliers by |w| sqrt(H_jj) (what an error in them costs)
instead of by |w|.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks import outlier_positions
from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.codebooks.row_table import RowTable
from quipkit.codebooks.scalar import GroupGrid
from quipkit.errors import QuipkitError

WHOLE_ROW = 1 << 30  # the inlier grid's group size by default: one group per row
OUTLIER_GRID_ITERS = 10  # Lloyd rounds fitting each row's outlier levels (they settle in a few)


@register_codebook("icquant")
class OutlierSplitGrid(Codebook):
    """b-bit inlier and outlier grids per row, with the outliers' positions index-coded (ICQuant)."""

    dim = 1

    def __init__(self, bits: int, ratio: float = 0.05, clip: bool = True, group_size: int | None = None,
                 index_bytes: int | None = None, inliers: str = "grid", saliency: str = "magnitude") -> None:
        if not 2 <= bits <= 8:
            raise QuipkitError(f"icquant needs 2 to 8 bits (a sign bit and magnitude bits for outliers), got {bits}")
        if not 0.0 <= ratio < 1.0:
            raise QuipkitError(f"the outlier ratio must be in [0, 1), got {ratio}; 0.05 is typical")
        super().__init__(bits)
        self.ratio, self.clip, self.group_size, self.index_bytes = float(ratio), clip, group_size, index_bytes
        if inliers not in ("grid", "table"):
            raise QuipkitError(f"icquant's inliers are on a 'grid' or a 'table', not {inliers!r}")
        if inliers == "table" and group_size is not None:
            raise QuipkitError("icquant's per-row table has no groups; drop group_size or use inliers='grid'")
        if saliency not in ("magnitude", "hessian"):
            raise QuipkitError(f"icquant picks outliers by 'magnitude' or 'hessian' saliency, not {saliency!r}")
        self.inlier_kind, self.saliency = inliers, saliency
        self.inliers = GroupGrid(bits, group_size=group_size or WHOLE_ROW, clip=clip) if inliers == "grid" \
            else RowTable(bits)
        self.magnitudes = 1 << (bits - 1)

    def spec(self) -> dict[str, Any]:
        spec = {"name": self.name, "bits": self.bits, "ratio": self.ratio, "clip": self.clip, "group_size": self.group_size}
        if self.inlier_kind != "grid":
            spec["inliers"] = self.inlier_kind
        if self.saliency != "magnitude":
            spec["saliency"] = self.saliency
        return spec if self.index_bytes is None else {**spec, "index_bytes": self.index_bytes}

    def packed_spec(self, stored: dict[str, Tensor]) -> dict[str, Any]:
        return {**self.spec(), "index_bytes": stored["positions"].numel()}

    def outliers(self, cols: int) -> int:
        """Outliers in each row of `cols` weights."""
        return round(self.ratio * cols)

    def outlier_mask(self, weight: Tensor, importance: Tensor | None = None) -> Tensor:
        """bool [rows, cols]: each row's `outliers(cols)` most salient weights of `weight` [rows, cols]:
        largest |w|, or with hessian saliency largest |w| sqrt(importance) (importance [cols]: H's diagonal)."""
        score = weight.abs()
        if self.saliency == "hessian" and importance is not None:
            score = score * importance.float().to(score.device).clamp_min(0.0).sqrt()
        mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
        return mask.scatter_(1, score.topk(self.outliers(weight.shape[1]), dim=1).indices, True)

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """The outlier mask (each row's most salient weights) and both grids of every row."""
        w = weight.float()
        mask = self.outlier_mask(w, importance)
        if self.inlier_kind == "table":  # k-means over the inliers only, each counted by its column's importance
            params = self.inliers.fit(w, importance, counted=~mask)
        else:  # zero lies inside every grid's range and rounds to itself: outliers set to 0 change nothing
            params = self.inliers.fit(torch.where(mask, 0.0, w))
        low, step = self._fit_outlier_grid(w.abs(), mask, importance)
        return {**params, "mask": mask, "outlier_low": low.half().float(), "outlier_step": step.half().float()}

    def _fit_outlier_grid(self, magnitude: Tensor, mask: Tensor, importance: Tensor | None) -> tuple[Tensor, Tensor]:
        """Each row's outlier levels `low + step * i` (low, step [rows]) for the outliers' magnitudes
        ([rows, cols] where `mask`): Lloyd's alternation on an even grid, from the span of the row's
        outliers, each counted by its column's `importance` [cols]. With few levels (two at 2 bits),
        levels at the ends of the span leave most outliers far from both; fitted, they sit where the
        outliers are. A row keeps the span where the fit does not lower its weighted error; a row
        without outliers gets 0, 0."""
        weight = torch.ones_like(magnitude) if importance is None else \
            importance.float().to(magnitude.device).clamp_min(1e-12).expand_as(magnitude)
        weight = torch.where(mask, weight, 0.0)
        top = self.magnitudes - 1
        low = torch.where(mask, magnitude, torch.inf).amin(1)
        low = torch.where(torch.isfinite(low), low, 0.0)
        step = (torch.where(mask, magnitude, 0.0).amax(1) - low) / max(top, 1)

        def levels(low: Tensor, step: Tensor) -> Tensor:
            position = (magnitude - low[:, None]) / torch.where(step > 0, step, 1.0)[:, None]
            return torch.where(step[:, None] > 0, position, 0.0).round().clamp(0, top)

        def error(low: Tensor, step: Tensor) -> Tensor:
            return (weight * (magnitude - low[:, None] - step[:, None] * levels(low, step)).square()).sum(1)

        fit_low, fit_step = low, step
        for _ in range(OUTLIER_GRID_ITERS):
            level = levels(fit_low, fit_step)
            # weighted least squares of magnitude ~ low + step * level, per row
            s0, s1, s2 = weight.sum(1), (weight * level).sum(1), (weight * level.square()).sum(1)
            t0, t1 = (weight * magnitude).sum(1), (weight * magnitude * level).sum(1)
            det = s0 * s2 - s1.square()
            solvable = det > 1e-9 * s0.square()  # at least two levels in use
            safe = torch.where(solvable, det, 1.0)
            fit_low = torch.where(solvable, (s2 * t0 - s1 * t1) / safe, fit_low)
            fit_step = torch.where(solvable, ((s0 * t1 - s1 * t0) / safe).clamp_min(0.0), fit_step)
        better = error(fit_low, fit_step) < error(low, step)
        return torch.where(better, fit_low, low), torch.where(better, fit_step, step)

    def _outlier_grid(self, x: Tensor, low: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        """Codes and values of x on the sign-and-magnitude grid (`low`, `step` broadcast to x)."""
        level = torch.where(step > 0, (x.abs() - low) / torch.where(step > 0, step, 1.0), 0.0)
        level = level.round().clamp(0, self.magnitudes - 1)
        negative = x < 0
        value = low + step * level
        return (level + self.magnitudes * negative).to(torch.int32), torch.where(negative, -value, value)

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        codes, values = self.inliers.quantize(block, params, cols)
        out_codes, out_values = self._outlier_grid(block, params["outlier_low"][:, None], params["outlier_step"][:, None])
        outlier = params["mask"][:, cols]
        return torch.where(outlier, out_codes, codes), torch.where(outlier, out_values, values)

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        values = self.inliers.decode(codes, params)
        level = (codes % self.magnitudes).float()
        magnitude = params["outlier_low"][:, None] + params["outlier_step"][:, None] * level
        outlier_values = torch.where(codes >= self.magnitudes, -magnitude, magnitude)
        return torch.where(params["mask"], outlier_values, values)

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        width = outlier_positions.best_width(params["mask"])
        stream, _ = outlier_positions.encode(params["mask"], width)
        return {
            **self.inliers.pack(codes, params),
            "outlier_low": params["outlier_low"].half(),
            "outlier_step": params["outlier_step"].half(),
            "positions": torch.cat([stream.new_tensor([width]), stream]),
        }

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        codes, params = self.inliers.unpack(stored, rows, cols)
        positions = stored["positions"]
        counts = torch.full((rows,), self.outliers(cols), dtype=torch.int32, device=positions.device)
        mask = outlier_positions.decode(positions[1:], counts, int(positions[0]), cols)
        return codes, {**params, "mask": mask, "outlier_low": stored["outlier_low"].float(),
                       "outlier_step": stored["outlier_step"].float()}

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.index_bytes is None:
            raise QuipkitError("an icquant layer's spec lacks 'index_bytes' (the size of its outlier index); "
                               "the checkpoint is damaged or was written by another tool")
        return {
            **self.inliers.storage(rows, cols),
            "outlier_low": ((rows,), torch.float16),
            "outlier_step": ((rows,), torch.float16),
            "positions": ((self.index_bytes,), torch.uint8),
        }
