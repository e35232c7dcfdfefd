"""Calibration statistics: H = E[x x^T] of a linear layer's inputs, and its preparation for rounding."""

from __future__ import annotations

import torch
from torch import Tensor


class HessianAccumulator:
    """Running sum of x x^T over tokens; products in float32 per batch, the sum in float64."""

    def __init__(self, size: int, device: torch.device | str = "cpu") -> None:
        self.total = torch.zeros(size, size, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        """Add the inputs x [..., n] of one batch."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        self.total += (flat.t() @ flat).to(self.total.device, torch.float64)
        self.tokens += flat.shape[0]

    def mean(self) -> Tensor:
        """E[x x^T] [n, n] (float64)."""
        if self.tokens == 0:
            raise RuntimeError("no calibration tokens reached this layer")
        return self.total / self.tokens


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
