"""Rounding algorithms over (W, H, codebook): nearest, LDLQ/BlockLDLQ, greedy refinement."""

from quipkit.rounding.greedy import greedy_refine
from quipkit.rounding.hessian import HessianAccumulator, prepare_hessian, proxy_loss, relative_proxy_loss
from quipkit.rounding.ldlq import ldl_feedback, ldlq
from quipkit.rounding.nearest import round_nearest

__all__ = [
    "HessianAccumulator",
    "greedy_refine",
    "ldl_feedback",
    "ldlq",
    "prepare_hessian",
    "proxy_loss",
    "relative_proxy_loss",
    "round_nearest",
]
