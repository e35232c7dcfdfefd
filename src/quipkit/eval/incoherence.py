"""Incoherence diagnostics (QuIP): how spiky a layer's weights and Hessian are, before and after each
transform, and the proxy-loss bound that incoherence buys.

  mu_W = max |W_ij| sqrt(m n) / ||W||_F            (1 for a flat matrix, sqrt(mn) for one spike)
  mu_H = max |Q_ij| sqrt(n), H = Q diag(lambda) Q^T  (how aligned H's eigenvectors are with axes)
  LDLQ bound: E tr((Ŵ - W) H (Ŵ - W)^T) <= (g m mu_H^2 sigma^2 / n) tr(H^(1/2))^2
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from quipkit.codebooks import make_codebook
from quipkit.console import Reporter
from quipkit.models.structure import find_blocks, select_linears
from quipkit.pipeline.blockwise import collect_hessians
from quipkit.pipeline.capture import capture_block_calls
from quipkit.pipeline.layer_group import stable_seed
from quipkit.rounding.hessian import prepare_hessian
from quipkit.transforms import make_transform

TRANSFORMS = {"none": {"name": "identity"}, "rht": {"name": "rht"}, "kronecker": {"name": "kronecker", "rescale": True}}


def weight_incoherence(weight: Tensor) -> float:
    """mu_W of W [m, n]."""
    w = weight.double()
    return float(w.abs().max() * math.sqrt(w.numel()) / w.norm().clamp_min(1e-30))


def hessian_incoherence(hessian: Tensor) -> float:
    """mu_H of a symmetric H [n, n]: the largest eigenvector entry times sqrt(n)."""
    _, vectors = torch.linalg.eigh(hessian.double())
    return float(vectors.abs().max() * math.sqrt(hessian.shape[0]))


def trace_sqrt(hessian: Tensor) -> float:
    """tr(H^(1/2)) of a positive semidefinite H."""
    return float(torch.linalg.eigvalsh(hessian.double()).clamp_min(0).sqrt().sum())


def ldlq_bound(hessian: Tensor, rows: int, mu: float, sigma2: float, block: int = 1) -> float:
    """The QuIP/QuIP# bound (g m mu^2 sigma^2 / n) tr(H^(1/2))^2 on LDLQ's expected proxy loss, for a
    rounding with per-entry error variance sigma2."""
    return block * rows * mu**2 * sigma2 / hessian.shape[0] * trace_sqrt(hessian) ** 2


def grid_noise(bits: int) -> float:
    """Per-entry error variance of stochastic rounding on QuIP's uniform grid (unit-RMS units):
    at most step^2 / 4, the variance of the worst case x halfway between two levels."""
    cb = make_codebook({"name": "uniform", "bits": bits})
    return cb.step**2 / 4


def layer_incoherence(weight: Tensor, hessian: Tensor, seed: int, bits: int = 2, damping: float = 0.01) -> dict[str, Any]:
    """mu_W, mu_H and the relative LDLQ bound of one layer under each transform (H damped as for
    rounding). The bound is for QuIP's `bits`-bit grid on W scaled to unit RMS, relative to
    tr(W H W^T), like the relative proxy loss the quantizer reports."""
    h = prepare_hessian(hessian, damping)
    w = weight.double()
    unit = w / w.square().mean().sqrt()
    energy = float(((unit @ h) * unit).sum())
    tr_sqrt = trace_sqrt(h)
    rows, n = w.shape
    sigma2 = grid_noise(bits)
    out: dict[str, Any] = {}
    for label, spec in TRANSFORMS.items():
        transform = make_transform(spec)
        params = {**transform.fit_input(h, [weight.double()], seed), **transform.fit_output(weight.shape[0], seed + 1)}
        params = {k: v.double() if v.is_floating_point() else v for k, v in params.items()}
        w_t = transform.weight(weight.double(), params)
        h_t = transform.hessian(h, params)
        mu_h = hessian_incoherence(h_t)
        bound = rows * mu_h**2 * sigma2 / n * tr_sqrt**2 / energy
        out[label] = {"mu_w": weight_incoherence(w_t), "mu_h": mu_h, "bound": bound}
    return out


@torch.no_grad()
def incoherence_report(
    model: nn.Module, tokens: Tensor, batch_size: int, device: torch.device, bits: int = 2,
    reporter: Reporter | None = None,
) -> list[dict[str, Any]]:
    """Per linear layer: mu_W and mu_H before and after RHT and QuIP's Kronecker transform, from
    Hessians of the float model on calibration `tokens` [N, T]."""
    reporter = reporter or Reporter()
    prefix, blocks = find_blocks(model)
    calls = capture_block_calls(model, blocks, list(torch.split(tokens, batch_size)))
    inputs = calls.inputs
    rows = []
    with reporter.task("incoherence", len(blocks)) as task:
        for index, block in enumerate(blocks):
            block.to(device)
            linears = select_linears(block, f"{prefix}.{index}")
            inputs, groups, _ = collect_hessians(block, linears, inputs, calls.kwargs[index], device)
            for names, hessian in groups:
                for name in names:
                    weight = linears[name].weight.detach().to(device)
                    rows.append({"layer": name, "shape": list(weight.shape),
                                 **layer_incoherence(weight, hessian, stable_seed(0, name), bits)})
            block.to("cpu")
            task.advance(1)
    return rows
