"""CALDERA: W ≈ Q + L R, a low-precision Q plus low-rank factors that are themselves quantized.

Minimises ||(W - Q - L R) H^(1/2)||_F^2 per layer. L R starts as the quantized rank-k fit of W in
the plain Frobenius norm, and the codes' scale is set once, from what W's float plain rank-k fit
leaves: LDLQ's error grows with the RMS of what it rounds, whatever its direction, so the first term
takes the directions that lower that RMS most (and the rest, smaller than W, would waste the
codebook's grid at W's scale). Starting from the H-weighted fit instead left a larger RMS to Q, and
a 5% higher proxy on every layer of block 3 of the reference model at rank 32. Then, `outer_iters`
times:
  Q <- LDLQ(W - L R), kept if it lowers the loss under the current L R;
  L R <- the better of a fresh and a warm-started fit of W - Q, kept if it lowers the loss. A fit is
       the SVD of (W - Q) C (H = C C^T), singular values split evenly between L and R, or the current
       L, then `inner_iters` rounds of least squares with each factor rounded by LDLQ through its own
       Hessian (R H R^T for L's rows, exact; H for R's rows, exact when L's columns are orthogonal,
       as the SVD start makes them).
So the proxy never rises; the paper's plain alternation (from L R = 0, everything refit each round)
rose after its first round on real layers. The proxy after every outer iteration is reported. Rows
of different layers never mix: LDLQ is row-independent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook
from quipkit.codebooks.low_rank import ROW_SCALES, LowRank
from quipkit.rounding.ldlq import ldl_feedback, ldlq
from quipkit.rounding.solvers import Problem, Solution, register_solver, round_main

FACTOR_DAMPING = 0.01  # of the mean diagonal, added to the factors' Hessians (R H R^T can be singular)


def _damped(hessian: Tensor) -> Tensor:
    """H [k, k] + 1% of its mean diagonal: positive definite even where a factor row is zero."""
    shift = FACTOR_DAMPING * float(torch.diagonal(hessian).mean().clamp_min(1e-12))
    return hessian + shift * torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)


@dataclass(frozen=True)
class LayerHessian:
    """A layer's H [n, n] with what every fit under it reuses: its lower Cholesky factor (H = C C^T) and
    the LDLQ feedback of the damped H that R's rows round under (factored once, not once per fit)."""

    hessian: Tensor  # [n, n]
    chol: Tensor  # [n, n]
    feedback: Tensor  # [n, n], ldl_feedback of _damped(hessian) for the factors' codebook

    @classmethod
    def of(cls, hessian: Tensor, factor_codebook: Codebook) -> "LayerHessian":
        return cls(hessian, torch.linalg.cholesky(hessian), ldl_feedback(_damped(hessian), factor_codebook.dim))


def _round_factor(factor: Tensor, hessian: Tensor, low_rank: LowRank,
                  feedback: Tensor | None = None) -> tuple[tuple[Tensor, dict], Tensor]:
    """Rows of `factor` [r, c] rounded by LDLQ under `hessian` [c, c] (or its damped form's `feedback`
    [c, c] when the caller has it) -> ((codes, params), values [r, c]). A unit-scale code rounds each
    row at the code's RMS and keeps the row's scale (rows are independent under LDLQ)."""
    codebook = low_rank.codebook
    scales, target = low_rank.scale_rows(factor) if low_rank.row_scaled else (None, factor)
    params = codebook.fit(target)
    codes, values = ldlq(target, _damped(hessian), codebook, params, feedback=feedback)
    if scales is None:
        return (codes, params), values
    return (codes, {**params, ROW_SCALES: scales}), values * scales[:, None]


def _quadratic(error: Tensor, hessian: Tensor) -> float:
    """tr(E H E^T) for E [r, n], H [n, n]."""
    return float(((error @ hessian) * error).sum())


def fit_low_rank(residual: Tensor, weighting: LayerHessian, low_rank: LowRank, inner_iters: int,
                 left: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor, float]:
    """The quantized rank-k fit of `residual` [m, n] under the layer's H [n, n], from the SVD or, given
    `left` [m, k] (a stored L, decoded), from there -> (the stored tensors, L R [m, n] as stored,
    tr(E H E^T) of what is left)."""
    hessian = weighting.hessian
    if left is None:
        left, right = _svd_factors(residual, weighting.chol, low_rank.rank)
        left = _round_factor(left, right @ hessian @ right.t(), low_rank)[1]
    weighted = residual @ hessian  # [m, n], for L's least squares
    best = None
    for _ in range(inner_iters):
        right = torch.linalg.solve(_damped(left.t() @ left), left.t() @ residual)  # [k, n]
        right_stored, right = _round_factor(right, hessian, low_rank, weighting.feedback)
        right_gram = right @ hessian @ right.t()  # [k, k]
        left = torch.linalg.solve(_damped(right_gram), (weighted @ right.t()).t()).t()  # [m, k]
        left_stored, left = _round_factor(left, right_gram, low_rank)
        product = left @ right
        loss = _quadratic(residual - product, hessian)
        if best is None or loss < best[2]:
            best = (low_rank.pack(left_stored, right_stored), product, loss)
    return best


def _svd_factors(weight: Tensor, chol: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-k (L [m, k], R [k, n]) of `weight` [m, n] under H = chol chol^T, float, with the
    singular values split evenly between them (so both quantize alike). The top singular pairs of
    A = W C come from the eigenvectors of its smaller Gram matrix in float64: a full SVD of A cost
    10x more, and up to 50x when another job shares the cores."""
    a = (weight @ chol).double()  # [m, n]
    tall = a.shape[0] >= a.shape[1]
    eigenvalues, vectors = torch.linalg.eigh(a.t() @ a if tall else a @ a.t())  # ascending
    vectors = vectors[:, -rank:].flip(1)  # the top k, largest first: V [n, k] or U [m, k]
    root = eigenvalues[-rank:].flip(0).clamp_min(0.0).sqrt().sqrt()  # S^1/2
    safe = torch.where(root > 0, root, 1.0)
    if tall:  # U S^1/2 = A V S^-1/2
        left, right_t = (a @ vectors) / safe, vectors * root
    else:  # V S^1/2 = A^T U S^-1/2
        left, right_t = vectors * root, (a.t() @ vectors) / safe
    # R C = S^1/2 V^T  ->  C^T R^T = V S^1/2
    right = torch.linalg.solve_triangular(chol.t(), right_t.to(chol.dtype), upper=True).t()
    return left.to(weight.dtype), right


def _solve_layer(problem: Problem, target: Tensor, weighting: LayerHessian, plain: LayerHessian,
                 low_rank: LowRank) -> dict:
    """One layer's rows `target` [m, n]: the best (codes, L R) and the proxy after each outer iteration.

    The codes' scale is set once, from what the float plain rank-k fit leaves of W (`plain`: H = I);
    L R lives in that scale, so its factors need no scale of their own. Each step is kept only if it
    lowers the loss: LDLQ's new codes against the old ones under the current L R, and the fresh and
    the warm-started fits of the factors against the current ones."""
    codebook, options, hessian = problem.codebook, problem.options, weighting.hessian
    left, right = _svd_factors(target, plain.chol, low_rank.rank)
    scale = 1.0
    if codebook.target_rms is not None:
        scale = float((target - left @ right).square().mean().sqrt().clamp_min(1e-12)) / codebook.target_rms
    weight = target / scale
    stored, product, _ = fit_low_rank(weight, plain, low_rank, options["inner_iters"])
    total = max(_quadratic(target, hessian), 1e-30)
    best, history, loss = None, [], None  # loss: of the kept codes under the kept L R
    for _ in range(options["outer_iters"]):
        residual = weight - product
        params = codebook.fit(residual)
        codes, values, kept = round_main(problem, residual, params)
        trial = _quadratic(weight - values - product, hessian)
        if best is None or trial < loss:
            best, loss = {"codes": codes, "values": values, "params": params, "kept": kept}, trial
        rest = weight - best["values"]
        current = low_rank.factors(stored, *target.shape)[0]
        for fitted in (fit_low_rank(rest, weighting, low_rank, options["inner_iters"]),
                       fit_low_rank(rest, weighting, low_rank, options["inner_iters"], left=current)):
            if fitted[2] < loss:
                stored, product, loss = fitted
        history.append(loss * scale**2 / total)
    return {**best, "values": (best["values"] + product) * scale, "scale": scale, "stored": stored, "history": history}


@register_solver("caldera")
def caldera(problem: Problem) -> Solution:
    """Options: rank, codebook (the factors'), outer_iters, inner_iters (QuantConfig.low_rank). Each layer
    of the stack gets its own L R and scale."""
    low_rank = LowRank(problem.options["rank"], problem.options["codebook"])
    identity = torch.eye(problem.target.shape[1], device=problem.target.device)
    plain = LayerHessian.of(identity, low_rank.codebook)
    weighting = plain if problem.hessian is None else LayerHessian.of(problem.hessian, low_rank.codebook)
    layers = [_solve_layer(problem, part, weighting, plain, low_rank)
              for part in torch.split(problem.target, problem.sizes)]
    return Solution(
        codes=torch.cat([layer["codes"] for layer in layers]),
        values=torch.cat([layer["values"] for layer in layers]),
        params={key: torch.cat([layer["params"][key] for layer in layers]) for key in layers[0]["params"]},
        greedy_sweeps=min(layer["kept"] for layer in layers),
        scales=[layer["scale"] for layer in layers],
        low_rank=[layer["stored"] for layer in layers],
        history=[layer["history"] for layer in layers],
    )
