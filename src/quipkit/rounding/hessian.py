"""Calibration statistics: H = E[x x^T] of a linear layer's inputs, and its preparation for rounding."""

from __future__ import annotations

import torch
from torch import Tensor


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(s, e) with s = fl(a + b) and s + e = a + b exactly (Knuth's TwoSum), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


class HessianAccumulator:
    """Running sum of x x^T over tokens: products in float32 per batch, summed exactly.

    The sum is held as a float64 pair (high part, rounding errors) that represents it exactly, so the
    result is the correctly rounded sum whatever the order or grouping of the batches: the same
    Hessian from one process or from several that each summed a share (`merge`). (Exact while one
    entry's products across batches span less than about 2^70 in magnitude.)
    """

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.high = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.low = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add the inputs x [..., n] of one batch."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self._add((flat.t() @ flat).to(self.high.device, torch.float64), torch.zeros((), dtype=torch.float64))
        self.tokens += flat.shape[0]

    def _add(self, high: Tensor, low: Tensor) -> None:
        self.high, error = _two_sum(self.high, high)
        self.low += error + low

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another accumulator's sum (another process's share of the batches)."""
        self._add(other.high.to(self.high.device), other.low.to(self.high.device))
        self.tokens += other.tokens

    def mean(self) -> Tensor:
        """E[x x^T] [n, n] (float64)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return (self.high + self.low) / self.tokens


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


def proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """tr((Ŵ - W) H (Ŵ - W)^T) for W, Ŵ [m, n] and H [n, n]."""
    err = (approx - weight).double()
    return float(((err @ hessian.double()) * err).sum())


def relative_proxy_loss(weight: Tensor, approx: Tensor, hessian: Tensor) -> float:
    """The proxy loss relative to tr(W H W^T): 0 is exact, 1 is as bad as a zero matrix."""
    w = weight.double()
    denom = float(((w @ hessian.double()) * w).sum())
    return proxy_loss(weight, approx, hessian) / max(denom, 1e-30)
