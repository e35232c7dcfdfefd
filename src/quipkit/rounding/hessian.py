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


def prepare_hessian(hessian: Tensor, damping: float) -> Tensor:
    """Normalise H [n, n] to mean diagonal 1, give dead inputs a unit diagonal, add `damping` * I."""
    h = hessian.double().clone()
    diag = torch.diagonal(h)
    mean = diag.mean()
    if mean > 0:
        h /= mean
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damping
    return h


def proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """tr((Ŵ - W) H (Ŵ - W)^T) for W, Ŵ [m, n] and H [n, n] (None: the identity)."""
    err = (approx - weight).double()
    return float(((err @ hessian.double() if hessian is not None else err) * err).sum())


def relative_proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor | None) -> float:
    """The proxy loss relative to tr(W H W^T) (None: H = I): 0 is exact, 1 is as bad as a zero matrix."""
    w = weight.double()
    denom = float(((w @ hessian.double() if hessian is not None else w) * w).sum())
    return proxy_loss(weight, approx, hessian) / max(denom, 1e-30)
