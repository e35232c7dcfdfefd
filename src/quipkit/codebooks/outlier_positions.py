"""ICQuant's index code: where each row's outliers sit, as gap symbols with an escape.

Per row, the outlier columns p_0 < p_1 < ... are coded by their gaps g_j = p_j - p_{j-1} - 1 (p_-1 = -1),
each as fixed-width B-bit symbols: `escape` = 2^B - 1 says "that many inlier columns, no outlier yet",
any smaller symbol r says "r inlier columns, then an outlier". A gap g thus costs B * (1 + g // escape)
bits, and B is chosen per matrix to minimise the total (at 5% outliers about 0.31 bits per weight, against
the entropy floor h(0.05) = 0.286). Rows follow one another in one stream; the per-row outlier counts
say where a row ends, so a row may have no outliers or be all outliers. Everything is vectorised: no
loop over rows or outliers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quipkit.errors import QuipkitError
from quipkit.layers.packing import pack_bits, unpack_bits

WIDTHS = range(1, 17)  # symbol widths tried (pack_bits's range)


def entropy_bits(ratio: float) -> float:
    """h(ratio): the fewest bits per weight any code of an i.i.d. outlier mask with that density needs."""
    if ratio <= 0.0 or ratio >= 1.0:
        return 0.0
    return -(ratio * math.log2(ratio) + (1 - ratio) * math.log2(1 - ratio))


def gaps(mask: Tensor) -> Tensor:
    """Gaps [k] (int64) before each outlier of `mask` [rows, cols], rows in order, columns ascending."""
    rows, cols = mask.nonzero(as_tuple=True)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    previous = torch.where(first, -1, torch.roll(cols, 1))
    return cols - previous - 1


def symbol_count(gap: Tensor, width: int) -> int:
    """Symbols that the gaps `gap` [k] take at `width` bits each."""
    return int((gap // ((1 << width) - 1) + 1).sum())


def best_width(mask: Tensor) -> int:
    """The symbol width that codes `mask` [rows, cols] in the fewest bits (the smaller one on a tie)."""
    found = gaps(mask)
    return min(WIDTHS, key=lambda width: (width * symbol_count(found, width), width))


def encode(mask: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Outlier mask [rows, cols] (bool) -> (symbol stream uint8 [bytes], outliers per row int32 [rows])."""
    escape = (1 << width) - 1
    found = gaps(mask)
    runs = found // escape + 1  # symbols of each gap: its escapes, then the outlier's own
    total = int(runs.sum())
    symbols = torch.full((total,), escape, dtype=torch.int32, device=mask.device)
    if total:
        symbols[torch.cumsum(runs, 0) - 1] = (found % escape).to(torch.int32)
    return pack_bits(symbols, width), mask.sum(1, dtype=torch.int32)


def row_starts(stream: Tensor, per_row: int, rows: int, width: int) -> Tensor:
    """int64 [rows]: the symbol where each row's code starts in `stream` (uint8 [bytes]) when every row
    holds `per_row` outliers: one past the previous row's last outlier symbol (what a kernel needs to
    decode one row without walking the rows before it)."""
    if per_row and width not in WIDTHS:  # a width outside them would never end a kernel's walk
        raise QuipkitError(f"the outlier index's symbol width is {width}, not 1 to 16: the checkpoint is damaged")
    starts = torch.zeros(rows, dtype=torch.int64, device=stream.device)
    if per_row == 0 or rows < 2:
        return starts
    symbols = unpack_bits(stream, width, stream.shape[0] * 8 // width)
    outlier_at = (symbols != (1 << width) - 1).nonzero().squeeze(1)
    if outlier_at.shape[0] < per_row * (rows - 1):
        raise QuipkitError("the outlier index holds fewer outliers than its rows need: the checkpoint is damaged")
    starts[1:] = outlier_at[per_row - 1 : per_row * (rows - 1) : per_row] + 1
    return starts


def decode(stream: Tensor, counts: Tensor, width: int, cols: int) -> Tensor:
    """Inverse of `encode`: (stream uint8 [bytes], counts int32 [rows]) -> mask bool [rows, cols]."""
    escape = (1 << width) - 1
    rows = counts.shape[0]
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=stream.device)
    total = int(counts.sum())
    if total == 0:
        return mask
    symbols = unpack_bits(stream, width, stream.shape[0] * 8 // width)
    outlier_at = (symbols != escape).nonzero().squeeze(1)[:total]  # what follows is padding
    symbols = symbols[: int(outlier_at[-1]) + 1]
    # columns each symbol advances: an escape skips `escape` inliers, a symbol r skips r and takes one
    advance = torch.where(symbols == escape, escape, symbols + 1).to(torch.int64)
    end = torch.cumsum(advance, 0)[outlier_at]  # [k]: one past each outlier's column, counted from row 0
    row = torch.repeat_interleave(torch.arange(rows, device=stream.device), counts.long())
    first = (torch.cumsum(counts.long(), 0) - counts.long())[row]  # index of each outlier's row's first one
    base = torch.where(first > 0, end[(first - 1).clamp_min(0)], 0)
    mask[row, end - base - 1] = True
    return mask
