"""Calibration statistics: H = E[x x^T] of a linear layer's inputs, and its preparation for rounding."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianAccumulator:
    """Running sum of x x^T over tokens: products in float32 per batch, summed exactly.

    The sum is held as a float64 pair (high part, rounding errors) that represents it exactly, so the
    result is the correctly rounded sum whatever the order or grouping of the batches: the same
    Hessian from one process or from several that each summed a share (`merge`). (Exact while one
    entry's products across batches span less than about 2^70 in magnitude.) Float32 products add
    into float64 without error unless an entry's terms span more than 29 binary orders, so the errors
    are held sparsely (flat positions and values; none on real activations so far, 16 bytes an entry
    at worst): a dense error matrix cost a 7B MLP's Hessian another 1 GB. The sums run over row chunks, so the working memory beyond
    the pair is one batch's float32 product.
    """

    CHUNK_ROWS = 256

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.size = size
        self.high = torch.zeros(0, size, dtype=torch.float64, device=device)  # [n, n] from the first batch on
        self.low_index = torch.zeros(0, dtype=torch.int64, device=device)  # [k] sorted flat positions in high
        self.low_value = torch.zeros(0, dtype=torch.float64, device=device)  # [k] the errors there
        self.tokens = 0

    def add(self, x: Tensor, weight: Tensor | None = None) -> None:
        """Add the inputs x [..., n] of one batch, each token's x x^T times its `weight` [tokens] when given."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self._add(flat.t() @ (flat if weight is None else flat * weight.to(flat)[:, None]), None)
        self.tokens += flat.shape[0]

    def pair(self) -> Tensor:
        """[2, n, n] float64: the sum as (high part, errors), dense, to send to other processes."""
        pair = torch.zeros(2, self.size, self.size, dtype=torch.float64, device=self.high.device)
        if self.tokens:
            pair[0] = self.high
        self._errors_into(pair[1])
        return pair

    def _errors_into(self, dense: Tensor) -> Tensor:
        """`dense` [n, n] (zeros) with the held errors written in."""
        dense.view(-1)[self.low_index] = self.low_value
        return dense

    @classmethod
    def from_pair(cls, pair: Tensor, tokens: int) -> "HessianAccumulator":
        """The accumulator whose `pair()` is `pair` [2, n, n], the sum of `tokens` tokens."""
        accumulator = cls(pair.shape[-1], pair.device)
        if tokens:
            accumulator.high, accumulator.tokens = pair[0], tokens
            accumulator._add_low(*_nonzero(pair[1], 0))
        return accumulator

    def _add(self, high: Tensor, low: Tensor | None) -> None:
        """Add the exact value high + low ([n, n] each; low may be None: zero)."""
        if self.tokens == 0:  # the first term: stored as it is, exactly
            self.high = high.to(self.high.device, torch.float64, copy=True)
            if low is not None:
                self._add_low(*_nonzero(low.to(self.high.device, torch.float64), 0))
            return
        size = self.high.shape[1]
        found = []
        for start in range(0, self.high.shape[0], self.CHUNK_ROWS):
            rows = slice(start, start + self.CHUNK_ROWS)
            a, b = self.high[rows], high[rows].to(self.high.device, torch.float64)
            total = a + b  # TwoSum: total + error = a + b exactly
            virtual = total - a
            error = (a - (total - virtual)) + (b - virtual)
            self.high[rows] = total
            if low is not None:
                error += low[rows].to(self.high.device)
            found.append(_nonzero(error, start * size))
        self._add_low(torch.cat([index for index, _ in found]), torch.cat([value for _, value in found]))

    def _add_low(self, index: Tensor, value: Tensor) -> None:
        """Add errors `value` [k] at flat positions `index` [k] (unique) to the held ones."""
        if not len(index):
            return
        index = torch.cat([self.low_index, index.to(self.low_index.device)])
        value = torch.cat([self.low_value, value.to(self.low_value.device)])
        self.low_index, inverse = torch.unique(index, sorted=True, return_inverse=True)
        # at most two terms per position (held + new): their one addition is the same in either order
        self.low_value = torch.zeros(len(self.low_index), dtype=torch.float64, device=value.device).index_add_(0, inverse, value)

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another accumulator's sum (another process's share of the batches)."""
        if other.tokens == 0:
            return
        self._add(other.high, other._errors_into(torch.zeros_like(other.high)) if len(other.low_index) else None)
        self.tokens += other.tokens

    def mean(self) -> Tensor:
        """E[x x^T] [n, n] (float64)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        total = self.high.clone()
        total.view(-1)[self.low_index] += self.low_value
        return total / self.tokens

    def pop_mean(self) -> Tensor:
        """`mean()` computed in the accumulator's own memory, which it gives up (the same values)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        total, tokens = self.high, self.tokens
        total.view(-1)[self.low_index] += self.low_value
        self.high, self.tokens = torch.empty(0), 0
        self.low_index, self.low_value = self.low_index[:0], self.low_value[:0]
        return total.div_(tokens)


class RowGroupAccumulator:
    """One weighted accumulator per group of output rows (guided Hessians): group g adds each token's
    x x^T times that token's weight for g. `pop_mean` gives [G, n, n]."""

    def __init__(self, size: int, groups: int, device: torch.device | str = "cpu") -> None:
        self.parts = [HessianAccumulator(size, device) for _ in range(groups)]

    @property
    def tokens(self) -> int:
        return self.parts[0].tokens

    def add(self, x: Tensor, weights: Tensor) -> None:
        """x [..., n], weights [tokens, G]."""
        for g, part in enumerate(self.parts):
            part.add(x, weights[:, g])

    def pop_mean(self) -> Tensor:
        return torch.stack([part.pop_mean() for part in self.parts])


def _nonzero(error: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """(flat positions + `offset`, values) of the nonzero entries of `error` [r, n]."""
    index = torch.nonzero(error.reshape(-1)).squeeze(1)
    return index + offset, error.reshape(-1)[index]


def prepare_hessian(hessian: Tensor, damping: float, in_place: bool = False) -> Tensor:
    """Normalise H [n, n] to mean diagonal 1, give dead inputs a unit diagonal, add `damping` * I (in
    `hessian`'s own memory with `in_place`, when it is float64)."""
    h = hessian.double() if in_place else hessian.double().clone()
    diag = torch.diagonal(h)
    mean = diag.mean()
    if mean > 0:
        h /= mean
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping
    return h


PROXY_ROWS = 1024  # rows per step of the proxy sums: bounded work space for a 7B MLP's 90M weights
PROXY_COLS = 2048  # columns of H per step: a float32 H is never copied whole to float64


def _quadratic(left: Tensor, right: Tensor | None, hessian: Tensor | None, dtype: torch.dtype) -> float:
    """sum_r e_r H e_r^T over the rows of e = `left` - `right` ([m, n] each; `right` None: zero), the
    products in `dtype` and their sum in float64 (H None: the identity), a chunk of rows and a block of
    H's columns at a time."""
    total = 0.0
    for start in range(0, left.shape[0], PROXY_ROWS):
        rows = slice(start, start + PROXY_ROWS)
        e = (left[rows] - right[rows] if right is not None else left[rows]).to(dtype)
        if hessian is None:
            total += float((e * e).double().sum())
            continue
        for col in range(0, hessian.shape[1], PROXY_COLS):
            cols = slice(col, col + PROXY_COLS)
            total += float(((e @ hessian[:, cols].to(dtype)) * e[:, cols]).double().sum())
    return total


def proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """tr((Ŵ - W) H (Ŵ - W)^T) for W, Ŵ [m, n] and H [n, n] (None: the identity) in float64: greedy
    refinement decides by comparing these. Summed over row chunks: the whole error in float64 was 16
    bytes a weight."""
    return _quadratic(approx, weight, hessian, torch.float64)


def relative_proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """The proxy loss relative to tr(W H W^T) (None: H = I): 0 is exact, 1 is as bad as a zero matrix.
    A record, not a decision, so its products are float32 (relative error ~1e-6): in float64 they cost a
    7B block more time than GPTQ's rounding. A Hessian per group of rows ([G, n, n], guided) weighs
    each contiguous G-th of the rows with its own."""
    if hessian is not None and hessian.dim() == 3:
        rows = [slice(g * len(weight) // len(hessian), (g + 1) * len(weight) // len(hessian)) for g in range(len(hessian))]
        error = sum(_quadratic(approx[r], weight[r], h, torch.float32) for r, h in zip(rows, hessian))
        return error / max(sum(_quadratic(weight[r], None, h, torch.float32) for r, h in zip(rows, hessian)), 1e-30)
    error = _quadratic(approx, weight, hessian, torch.float32)
    return error / max(_quadratic(weight, None, hessian, torch.float32), 1e-30)
