"""Calibration statistics: H = E[x x^T] of a linear layer's inputs, and its preparation for rounding."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianAccumulator:
    """Running sum of x x^T over tokens: products in float32 per batch, summed exactly.

    The sum is held as a float64 pair (high part, rounding errors) that represents it exactly, so the
    result is the correctly rounded sum whatever the order or grouping of the batches: the same
    Hessian from one process or from several that each summed a share (`merge`). (Exact while one
    entry's products across batches span less than about 2^70 in magnitude.) The error part exists
    from the second batch on, and the sums run over row chunks, so the working memory beyond the
    pair is one batch's float32 product.
    """

    CHUNK_ROWS = 256

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.high = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.low: Tensor | None = None  # [size, size] float64 once a second batch came
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add the inputs x [..., n] of one batch."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self._add(flat.t() @ flat, None)
        self.tokens += flat.shape[0]

    def _add(self, high: Tensor, low: Tensor | None) -> None:
        """Add the exact value high + low ([n, n] each; low may be None: zero)."""
        if self.tokens == 0 and self.low is None:  # the first term: stored as it is, exactly
            self.high = high.to(self.high.device, torch.float64, copy=True)
            self.low = None if low is None else low.to(self.high.device, torch.float64, copy=True)
            return
        if self.low is None:
            self.low = torch.zeros_like(self.high)
        for start in range(0, self.high.shape[0], self.CHUNK_ROWS):
            rows = slice(start, start + self.CHUNK_ROWS)
            a, b = self.high[rows], high[rows].to(self.high.device, torch.float64)
            total = a + b  # TwoSum: total + error = a + b exactly
            virtual = total - a
            error = (a - (total - virtual)) + (b - virtual)
            self.high[rows] = total
            self.low[rows] += error if low is None else error + low[rows].to(self.high.device)

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another accumulator's sum (another process's share of the batches)."""
        if other.tokens == 0:
            return
        self._add(other.high, other.low)
        self.tokens += other.tokens

    def mean(self) -> Tensor:
        """E[x x^T] [n, n] (float64)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.high if self.low is None else self.high + self.low) / self.tokens

    def pop_mean(self) -> Tensor:
        """`mean()` computed in the accumulator's own memory, which it gives up (the same values)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        total, tokens = (self.high if self.low is None else self.high.add_(self.low)), self.tokens
        self.high, self.low, self.tokens = torch.empty(0), None, 0
        return total.div_(tokens)


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


def _quadratic(left: Tensor, right: Tensor, hessian: Tensor | None) -> float:
    """sum_r left_r H right_r^T over the rows of `left`, `right` [m, n] (float64; H None: identity)."""
    total = 0.0
    h = hessian.double() if hessian is not None else None
    for start in range(0, left.shape[0], PROXY_ROWS):
        a = left[start:start + PROXY_ROWS].double()
        b = right[start:start + PROXY_ROWS].double()
        total += float(((a @ h if h is not None else a) * b).sum())
    return total


def proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """tr((Ŵ - W) H (Ŵ - W)^T) for W, Ŵ [m, n] and H [n, n] (None: the identity), in one sum (greedy
    refinement compares these)."""
    err = (approx - weight).double()
    return float(((err @ hessian.double() if hessian is not None else err) * err).sum())


def relative_proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """The proxy loss relative to tr(W H W^T) (None: H = I): 0 is exact, 1 is as bad as a zero matrix.
    Summed over row chunks: a record of the result, with bounded work space."""
    err = approx - weight
    return _quadratic(err, err, hessian) / max(_quadratic(weight, weight, hessian), 1e-30)
