"""Greedy refinement: block coordinate descent on the proxy loss after (Block)LDLQ.

Each step re-rounds block k to `Q(Ŵ_k + (W - Ŵ) H_{:,k} H_kk^-1)`, the best block given all others.
A sweep visits every block once; a sweep is kept only if the proxy loss did not rise, and sweeping
stops at the first one that changes nothing or does not help.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.rounding.hessian import proxy_loss


ROWS = 1024  # rows per step of the products with H: their results stay this small (the same bits)


def greedy_refine(
    weight: Tensor,
    hessian: Tensor,
    codebook: Codebook,
    params: Params,
    codes: Tensor,
    values: Tensor,
    sweeps: int,
    lazy_batch: int = 128,
) -> tuple[Tensor, Tensor, int]:
    """Refine (codes, Ŵ [m, n]) of W [m, n] under H [n, n]. Returns (codes, Ŵ, sweeps kept)."""
    m, n = weight.shape
    g = codebook.dim
    nb = n // g
    w = weight.float()
    h = hessian.float().to(w.device)
    blocks = h.reshape(nb, g, nb, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, g, g]
    inv_blocks = torch.linalg.inv(blocks.double()).float()
    batch = max(g, lazy_batch - lazy_batch % g)
    cols = torch.arange(n, device=w.device)
    best = proxy_loss(w, values, h)
    kept = 0
    for _ in range(sweeps):
        new_codes, new_values = codes.clone(), values.clone()
        resid = torch.empty_like(w)  # [m, n]: (W - Ŵ) H, kept current for columns not yet visited
        for r in range(0, m, ROWS):
            resid[r:r + ROWS] = (w[r:r + ROWS] - new_values[r:r + ROWS]) @ h
        for b0 in range(0, n, batch):
            b1 = min(n, b0 + batch)
            before = new_values[:, b0:b1].clone()
            for k in range(b0, b1, g):
                kb = k // g
                target = new_values[:, k : k + g] + resid[:, k : k + g] @ inv_blocks[kb]
                code, q = codebook.quantize(target, params, cols[k : k + g])
                delta = q - new_values[:, k : k + g]
                new_values[:, k : k + g] = q
                new_codes[:, kb : kb + 1] = code
                resid[:, b0:b1] -= delta @ h[k : k + g, b0:b1]
            if b1 < n:
                change = new_values[:, b0:b1] - before
                for r in range(0, m, ROWS):
                    resid[r:r + ROWS, b1:] -= change[r:r + ROWS] @ h[b0:b1, b1:]
        loss = proxy_loss(w, new_values, h)
        if loss >= best:
            break
        best, codes, values = loss, new_codes, new_values
        kept += 1
    return codes, values, kept
