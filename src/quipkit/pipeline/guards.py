"""Numerical guards: what can go wrong in one layer's numbers, handled where a handling is correct.

A weight or Hessian with NaN/Inf has no correct quantization: the run stops, naming the layer. A
Hessian that is not positive definite after the configured damping gets ten times more until it is
(recorded), and dead inputs (a zero diagonal: a column no calibration token excites) get a unit
diagonal (counted). A proxy loss far above what the bit width gives on a well-behaved layer, and a
finished model far worse than the float one, are warnings in the run's JSON and at its end.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quipkit.errors import QuipkitError
from quipkit.numerics import count_nonfinite
from quipkit.rounding.hessian import prepare_hessian

MAX_DAMPING = 1.0  # relative to the mean diagonal: beyond this the Hessian says little about the inputs
PROXY_FACTOR = 8.0  # a layer is flagged when its relative proxy exceeds this times 4^-bits
UNUSABLE_FACTOR = 10.0  # a model is called unusable when its perplexity exceeds this times the float one's


def check_finite(tensor: Tensor, what: str, fix: str) -> None:
    """Raise one line naming `what` when `tensor` holds NaN or Inf."""
    bad = count_nonfinite(tensor)
    if bad:
        raise QuipkitError(f"{what} has {bad} NaN/Inf values of {tensor.numel()}; {fix}")


def definite_hessian(hessian: Tensor, damping: float, names: list[str], consume: bool = False
                     ) -> tuple[Tensor, float, int]:
    """(prepared H [n, n] float64, the damping that made it positive definite, number of dead inputs).

    The damping starts at `damping` and grows tenfold while a Cholesky factorisation fails. With
    `consume`, H is prepared in `hessian`'s own memory (a 7B MLP's is 1 GB)."""
    check_finite(hessian, f"the Hessian of {', '.join(names)}",
                 "the calibration activations overflow; check the float model on the calibration text")
    dead = int((torch.diagonal(hessian) == 0).sum())
    h = prepare_hessian(hessian, 0.0, in_place=consume)
    undamped = torch.diagonal(h).clone()
    used = damping
    while True:
        torch.diagonal(h).copy_(undamped + used)  # what prepare_hessian(hessian, used) gives
        if _factors_in_float32(h) or int(torch.linalg.cholesky_ex(h)[1]) == 0:
            return h, used, dead
        if used >= MAX_DAMPING:
            raise QuipkitError(f"the Hessian of {', '.join(names)} is not positive definite even with damping "
                               f"{used:g}; the calibration statistics are corrupt (delete the --hessian-cache entry)")
        used = min(MAX_DAMPING, max(used, 1e-6) * 10)


def _factors_in_float32(h: Tensor) -> bool:
    """Whether the Cholesky factorisation of H [n, n] succeeds in float32. It runs in place on one
    column-major float32 copy (LAPACK's layout: no further copy), so the check costs one float32 matrix
    next to H, not two."""
    work = torch.empty_strided(h.shape, (1, h.shape[0]), dtype=torch.float32, device=h.device).copy_(h)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    torch.linalg.cholesky_ex(work, out=(work, info))
    return int(info) == 0


def expected_proxy(bits: float) -> float:
    """The relative proxy loss of a good b-bit quantizer on incoherent weights: about 4^-b."""
    return 4.0 ** -bits


def proxy_warning(name: str, proxy: float, bits: int) -> str | None:
    limit = PROXY_FACTOR * expected_proxy(bits)
    if math.isfinite(proxy) and proxy <= limit:
        return None
    return (f"{name}: relative proxy loss {proxy:.3g} is far above what {bits} bits give on a well-behaved "
            f"layer (about {expected_proxy(bits):.3g}); its output error will be large")


def quality_warning(method: str, bits: int, quantized: float, reference: float) -> str | None:
    """A warning when the quantized model's quick perplexity is far worse than the float model's."""
    if math.isfinite(quantized) and quantized <= UNUSABLE_FACTOR * reference:
        return None
    better = "quip# or qtip" if method in ("rtn", "gptq", "quip") else "more bits"
    return (f"{bits}-bit {method} is unusable on this model: quick perplexity {quantized:.4g} vs {reference:.4g} "
            f"float; try {better}")
