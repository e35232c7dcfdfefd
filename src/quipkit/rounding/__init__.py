"""Rounding algorithms over (W, H, codebook): nearest, LDLQ/BlockLDLQ, greedy refinement, CALDERA;
`solvers` names them for the pipeline."""

from quipkit.rounding import caldera as _caldera  # noqa: F401  (registers the "caldera" solver)
from quipkit.rounding.greedy import greedy_refine
from quipkit.rounding.hessian import HessianAccumulator, prepare_hessian, proxy_loss, relative_proxy_loss
from quipkit.rounding.ldlq import ldl_feedback, ldlq
from quipkit.rounding.nearest import round_nearest
from quipkit.rounding.solvers import SOLVERS, Problem, Solution, solve

__all__ = [
    "HessianAccumulator",
    "Problem",
    "SOLVERS",
    "Solution",
    "greedy_refine",
    "ldl_feedback",
    "ldlq",
    "prepare_hessian",
    "proxy_loss",
    "relative_proxy_loss",
    "round_nearest",
    "solve",
]
