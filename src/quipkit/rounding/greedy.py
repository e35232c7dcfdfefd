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
from quipkit.rounding.ldlq import row_blocks, rows_of


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
    """Refine (codes, Ŵ [m, n]) of W [m, n] under H [n, n] in place. Returns (codes, Ŵ, sweeps kept).

    Rows are independent, so a sweep runs a block of rows at a time (`row_blocks`) and only the previous codes are
    kept for a sweep that does not help: Ŵ is restored by decoding them (decode gives exactly the values
    rounding gave), not from a second float copy of the matrix.
    """
    w = weight.float()
    h = hessian.float().to(w.device)
    nb = w.shape[1] // codebook.dim
    blocks = h.reshape(nb, codebook.dim, nb, codebook.dim).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [nb, g, g]
    inv_blocks = torch.linalg.inv(blocks.double()).float()
    best = proxy_loss(w, values, h)
    blocks_of_rows = row_blocks(codebook, *w.shape)
    kept = 0
    for _ in range(sweeps):
        before = codes.clone()
        for rows, code_rows in blocks_of_rows:
            _sweep_rows(w[rows], h, inv_blocks, codebook, rows_of(params, rows), codes[code_rows], values[rows],
                        lazy_batch)
        loss = proxy_loss(w, values, h)
        if loss >= best:
            codes.copy_(before)
            for rows, code_rows in blocks_of_rows:
                values[rows] = codebook.decode(before[code_rows], rows_of(params, rows))
            break
        best = loss
        kept += 1
    return codes, values, kept


def _sweep_rows(
    w: Tensor, h: Tensor, inv_blocks: Tensor, codebook: Codebook, params: Params, codes: Tensor, values: Tensor,
    lazy_batch: int,
) -> None:
    """One sweep over every column block of the rows `w` [r, n], updating their `codes` and Ŵ `values` [r, n]."""
    g = codebook.dim
    n = w.shape[1]
    batch = max(g, lazy_batch - lazy_batch % g)
    cols = torch.arange(n, device=w.device)
    resid = (w - values) @ h  # [r, n]: (W - Ŵ) H, kept current for columns not yet visited
    for b0 in range(0, n, batch):
        b1 = min(n, b0 + batch)
        before = values[:, b0:b1].clone()
        for k in range(b0, b1, g):
            kb = k // g
            target = values[:, k : k + g] + resid[:, k : k + g] @ inv_blocks[kb]
            code, q = codebook.quantize(target, params, cols[k : k + g])
            delta = q - values[:, k : k + g]
            values[:, k : k + g] = q
            codes[:, kb : kb + 1] = code
            resid[:, b0:b1] -= delta @ h[k : k + g, b0:b1]
        if b1 < n:
            resid[:, b1:] -= (values[:, b0:b1] - before) @ h[b0:b1, b1:]
