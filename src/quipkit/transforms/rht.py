"""The random Hadamard transform of QuIP# and QTIP: `V = Had_n^T diag(s_n)` with random signs."""

from __future__ import annotations

import torch
from torch import Tensor

from quipkit.transforms.base import Params, Transform, register_transform
from quipkit.transforms.hadamard import orthogonal_op


def random_signs(size: int, seed: int) -> Tensor:
    """A seeded ±1 vector [size] (fp16), identical on every machine."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (size,), generator=gen) * 2 - 1).half()


ROTATE_STEP = 1 << 21  # elements per step of a large rotation: the transform's copies stay this small


def rotate_rows(matrix: Tensor, signs: Tensor, out: Tensor | None = None) -> Tensor:
    """Each row r of `matrix` [k, n] -> Had_n^T (signs ⊙ r), written into `out` [k, n] when given (which
    may be `matrix` itself, or a view of it laid out the same way). A large matrix goes a block of rows at
    a time (the same bits: rows are independent), where the whole at once took five copies of it (1.3 GB
    for a 5632-wide float64 Hessian)."""
    op, s = orthogonal_op(matrix.shape[-1]), signs.to(matrix)
    if matrix.dim() != 2 or matrix.numel() <= ROTATE_STEP:
        rotated = op.apply(matrix * s, transpose=True)
        return rotated if out is None else out.copy_(rotated)
    out = torch.empty(matrix.shape, dtype=matrix.dtype, device=matrix.device) if out is None else out
    step = max(1, ROTATE_STEP // matrix.shape[1])
    for start in range(0, matrix.shape[0], step):
        out[start:start + step] = op.apply(matrix[start:start + step] * s, transpose=True)
    return out


@register_transform("rht")
class RandomHadamard(Transform):
    """x -> Had_n^T (s_n ⊙ x); y -> s_m ⊙ Had_m y~. Signs are stored (fp16), so loading needs no seed."""

    def fit_input(self, hessian: Tensor, weights: list[Tensor], seed: int) -> Params:
        return {"su": random_signs(hessian.shape[0], seed)}

    def fit_output(self, rows: int, seed: int) -> Params:
        return {"sv": random_signs(rows, seed)}

    def weight(self, weight: Tensor, params: Params) -> Tensor:
        w = rotate_rows(weight, params["su"])  # W S_n Had_n
        return rotate_rows(w.t(), params["sv"].sign()).t()  # Had_m^T S_m (.)

    def hessian(self, hessian: Tensor, params: Params, consume: bool = False) -> Tensor:
        # consumed: both rotations in H's own memory (a block of rows, then of columns, at a time): a
        # second n x n float64 matrix was the rounding's peak for a wide layer (254 MB for TinyLlama's MLP)
        h = rotate_rows(hessian, params["su"], out=hessian if consume else None)
        return rotate_rows(h.t(), params["su"], out=h.t()).t()

    # The online transforms run as the quipkit::hadamard kernel op; imported on first use because
    # the kernels' reference path imports this package.
    def input(self, x: Tensor, params: Params) -> Tensor:
        from quipkit.kernels.ops import hadamard

        return hadamard(x, params["su"], None, transpose=True)

    def output(self, y: Tensor, params: Params) -> Tensor:
        from quipkit.kernels.ops import hadamard

        return hadamard(y, None, params["sv"], transpose=False)

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"su": ((cols,), torch.float16), "sv": ((rows,), torch.float16)}
