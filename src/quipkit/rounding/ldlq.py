"""LDLQ / BlockLDLQ: round column blocks in order, feeding back the exact correction for earlier ones.

With `H = M D M^T`, `M` unit block-upper-triangular (g x g blocks), rounding block k of
`W + (W - Ŵ)(M - I)` makes the proxy loss `sum_k tr(η_k D_k η_k^T)`, η the per-block rounding
error. In terms of η the feedback is `W_{>k} += η_k A_{k, >k}` with `A = M^-1 = blockdiag(G)^-1 G`,
`G` the upper Cholesky factor of `H^-1`. For g = 1 this is exactly GPTQ's column loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.errors import QuipkitError
from quipkit.numerics import count_nonfinite

ROW_BYTES = 32 << 20  # a row block's float32 working copy: rounding in such blocks bounds the extra memory
SOLVE_BYTES = 8 << 20  # a band of the feedback matrix solved at once


def ldl_feedback(hessian: Tensor, block: int, order: Tensor | None = None) -> Tensor:
    """A [n, n] (float32): the unit block-upper-triangular feedback matrix of H for g = `block`, with
    H's rows and columns taken in `order` [n] when given. The factorisation runs in float32 and again in
    float64 (from H's own values: the pipeline hands over a float32 H) only where float32 fails.
    Intermediates are freed as soon as they are used: for a 7B MLP each is 0.5 GB."""
    n = hessian.shape[0]
    nb = n // block
    for dtype in (torch.float32, torch.float64):
        h = hessian.to(dtype)
        if order is not None:
            h = h[order[:, None], order]
        chol, info = torch.linalg.cholesky_ex(h)
        del h
        if info.item() != 0:
            continue
        inverse = torch.cholesky_inverse(chol)
        del chol
        g, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if info.item() != 0 or count_nonfinite(g):
            continue
        # A = blockdiag(G)^-1 G, solved in G's own memory a band of block rows at a time (a band's
        # diagonal blocks lie in the band): the whole at once took two more n x n matrices
        rows = g.view(nb, block, n)
        band = max(1, SOLVE_BYTES // (block * n * g.element_size()))
        for start in range(0, nb, band):
            part = rows[start : start + band]  # [b, g, n]
            diag = part.view(-1, block, nb, block).diagonal(offset=start, dim1=0, dim2=2).permute(2, 0, 1)
            rows[start : start + band] = torch.linalg.solve_triangular(diag, part, upper=True)
        if not count_nonfinite(g):
            return g.float().contiguous()  # row-major, as the rounding loop reads it
    raise QuipkitError("the Hessian is not positive definite even in float64; raise --damping")


def ldlq(
    weight: Tensor,
    hessian: Tensor,
    codebook: Codebook,
    params: Params,
    order: Tensor | None = None,
    lazy_batch: int = 128,
    feedback: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Round W [m, n] under H [n, n] -> (codes [m / row_block, n / dim, ...], Ŵ [m, n]).

    `order` [n] is a column permutation (act-order; scalar codebooks only). `feedback` [n, n]:
    `ldl_feedback(H, dim, order)` from a caller that rounds many matrices under one H. Updates to columns
    beyond the current `lazy_batch` are applied once per batch, as one matrix product. Rows are
    independent, so they are rounded a block of rows at a time (`row_blocks`): the working copy of W
    stays that small.
    """
    m, n = weight.shape
    g = codebook.dim
    if order is not None and g != 1:
        raise ValueError("a column order (act-order) needs a codebook that rounds one column at a time")
    cols = torch.arange(n, device=weight.device) if order is None else order.to(weight.device)
    if feedback is None:
        feedback = ldl_feedback(hessian, g, None if order is None else cols)
    feedback = feedback.to(weight.device)
    values = torch.empty(m, n, device=weight.device)
    codes: Tensor | None = None
    for rows, code_rows in row_blocks(codebook, m, n):
        part = _ldlq_rows(weight[rows], feedback, codebook, rows_of(params, rows), cols, order is not None, lazy_batch,
                          values[rows])
        if codes is None:
            codes = part.new_empty((m // codebook.row_block, *part.shape[1:]))
        codes[code_rows] = part
    return codes, values


def row_blocks(codebook: Codebook, rows: int, cols: int) -> list[tuple[slice, slice]]:
    """(rows of W, rows of its codes) of the blocks rounded together: at most ROW_BYTES of float32 `cols`
    wide, in whole row blocks of the codebook (fewer, larger blocks would save Python steps; smaller
    ones, memory)."""
    step = ROW_BYTES // (4 * cols)
    step = max(codebook.row_block, step - step % codebook.row_block)
    unit = codebook.row_block
    return [(slice(r, r + step), slice(r // unit, (r + step) // unit)) for r in range(0, rows, step)]


def rows_of(params: Params, rows: slice) -> Params:
    """The codebook parameters of `rows` (every parameter's first dim is the matrix's rows)."""
    return {key: value[rows] for key, value in params.items()}


def _ldlq_rows(
    weight: Tensor, feedback: Tensor, codebook: Codebook, params: Params, cols: Tensor, ordered: bool, lazy_batch: int,
    values: Tensor,
) -> Tensor:
    """LDLQ of the rows `weight` [r, n] with the columns in order `cols` [n] (`ordered`: not 0..n-1):
    writes Ŵ into `values` [r, n] (the final columns), returns the codes."""
    r, n = weight.shape
    g = codebook.dim
    w = weight.float()[:, cols]  # indexing copies: the caller's weight is untouched
    batch = max(g, lazy_batch - lazy_batch % g)
    # results go straight to their final columns: no list of pieces to join, no copy to undo the order
    codes: Tensor | None = None
    place = cols.tolist()
    for b0 in range(0, n, batch):
        b1 = min(n, b0 + batch)
        err = torch.empty(r, b1 - b0, device=w.device)
        for k in range(b0, b1, g):
            target = w[:, k : k + g]
            code, q = codebook.quantize(target, params, cols[k : k + g])
            width = code.shape[1]
            if codes is None:
                codes = code.new_empty((code.shape[0], width * (n // g), *code.shape[2:]))
            if not ordered:
                values[:, k : k + g] = q
                codes[:, k // g * width : (k // g + 1) * width] = code
            else:
                values[:, place[k]] = q[:, 0]
                codes[:, place[k]] = code[:, 0]
            eta = q - target
            err[:, k - b0 : k - b0 + g] = eta
            if k + g < b1:
                w[:, k + g : b1] += eta @ feedback[k : k + g, k + g : b1]
        if b1 < n:
            w[:, b1:] += err @ feedback[b0:b1, b1:]
    return codes
