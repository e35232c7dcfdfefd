"""Per-layer solvers by name: what `QuantConfig.rounding` chooses (nearest, ldlq, caldera).

A solver takes the stacked, transformed weights of the layers that share an input and their
Hessian, and returns the main codebook's codes, the weights the layers will compute, and anything
else a layer stores (a low-rank term). A new method adds a solver here, not a branch in the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.errors import QuipkitError
from quipkit.rounding.greedy import greedy_refine
from quipkit.rounding.ldlq import ldlq
from quipkit.rounding.nearest import round_nearest


@dataclass
class Problem:
    """The stacked layers of one group, as the rounding sees them."""

    target: Tensor  # [m, n] the layers' transformed weights, stacked by rows
    hessian: Tensor | None  # [n, n] float32, the transformed damped Hessian; None: H = I
    codebook: Codebook
    params: Params  # the codebook's fit to `target`
    order: Tensor | None  # [n] a column order (act-order), or None
    sizes: list[int]  # the rows of each layer in the stack
    greedy_sweeps: int = 0
    options: dict[str, Any] = field(default_factory=dict)  # the solver's own settings (QuantConfig.low_rank)


@dataclass
class Solution:
    codes: Tensor  # [m / row_block, n / dim, ...] the main codebook's codes
    values: Tensor  # [m, n] what the layers compute, in the target's scale
    params: Params  # the main codebook's parameters the codes decode with
    greedy_sweeps: int = 0  # greedy sweeps kept
    # per layer: the factor its codes decode to a `target` row's scale, the low-rank term's stored
    # tensors, and the relative proxy loss after each outer iteration of an iterative solver
    scales: list[float] | None = None
    low_rank: list[dict[str, Tensor]] | None = None
    history: list[list[float]] | None = None


Solver = Callable[[Problem], Solution]
SOLVERS: dict[str, Solver] = {}


def register_solver(name: str) -> Callable[[Solver], Solver]:
    def decorate(fn: Solver) -> Solver:
        SOLVERS[name] = fn
        return fn

    return decorate


def solve(name: str, problem: Problem) -> Solution:
    if name not in SOLVERS:
        raise QuipkitError(f"unknown rounding '{name}'; choose one of {', '.join(SOLVERS)}")
    if problem.hessian is not None and problem.hessian.dim() == 3:
        return _by_row_groups(name, problem)
    return _refit(problem, SOLVERS[name](problem))


def _refit(problem: Problem, solution: Solution) -> Solution:
    """The codebook's parameters fit again to the chosen codes through the Hessian, for codebooks that
    can (llama.cpp's block scales); the values follow."""
    if problem.hessian is None or solution.low_rank:
        return solution
    params = problem.codebook.refit(solution.codes, solution.params, problem.target, problem.hessian)
    if params is solution.params:
        return solution
    return replace(solution, params=params, values=problem.codebook.decode(solution.codes, params))


def _by_row_groups(name: str, problem: Problem) -> Solution:
    """A Hessian per contiguous group of rows ([G, n, n], guided): each group is its own problem, rounded
    against its own Hessian (act-order by its own diagonal), and the parts are joined by rows."""
    if problem.options or len(problem.sizes) != 1:
        raise QuipkitError("guided Hessians round one layer at a time with the ldlq or nearest rounding")
    groups, rows = problem.hessian.shape[0], problem.target.shape[0]
    step = rows // groups
    per_row = {k for k, v in problem.params.items() if v.dim() and v.shape[0] == rows}  # others: the matrix's
    parts = []
    for g in range(groups):
        cut = slice(g * step, (g + 1) * step)
        params = {k: v[cut] if k in per_row else v for k, v in problem.params.items()}
        order = torch.argsort(torch.diagonal(problem.hessian[g]), descending=True) if problem.order is not None else None
        parts.append(solve(name, replace(problem, target=problem.target[cut], hessian=problem.hessian[g],
                                         params=params, order=order, sizes=[step])))
    joined = {k: torch.cat([part.params[k] for part in parts]) if k in per_row else parts[0].params[k]
              for k in parts[0].params}
    return Solution(torch.cat([p.codes for p in parts]), torch.cat([p.values for p in parts]), joined,
                    min(p.greedy_sweeps for p in parts))


def round_main(problem: Problem, target: Tensor, params: Params, nearest: bool = False) -> tuple[Tensor, Tensor, int]:
    """`target` [m, n] rounded with the problem's codebook and `params`: LDLQ through the Hessian (or
    to nearest), then the greedy sweeps -> (codes, values [m, n], sweeps kept)."""
    if nearest:
        codes, values = round_nearest(target, problem.codebook, params)
    else:
        codes, values = ldlq(target, problem.hessian, problem.codebook, params, problem.order)
    if not problem.greedy_sweeps:
        return codes, values, 0
    return greedy_refine(target, problem.hessian, problem.codebook, params, codes, values, problem.greedy_sweeps)


@register_solver("nearest")
def _nearest(problem: Problem) -> Solution:
    codes, values, kept = round_main(problem, problem.target, problem.params, nearest=True)
    return Solution(codes, values, problem.params, kept)


@register_solver("ldlq")
def _ldlq(problem: Problem) -> Solution:
    codes, values, kept = round_main(problem, problem.target, problem.params)
    return Solution(codes, values, problem.params, kept)
