"""The eager kernels: dequantize the whole weight, then one matmul; the torch Hadamard transform.

They apply to every codebook, device and shape, and they are the oracle every fast kernel is tested
against.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from quipkit.transforms.hadamard import orthogonal_op


def reference_matmul(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """x [..., cols] @ W^T -> [..., rows], W decoded from the layer's stored `tensors` (storage order)."""
    stored = dict(zip(codebook.storage(rows, cols), tensors))
    return x @ codebook.dequantize(stored, rows, cols).to(x.dtype).t()


def reference_decode(tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    """The dense weight W [rows, cols] (float32)."""
    return codebook.dequantize(dict(zip(codebook.storage(rows, cols), tensors)), rows, cols)


def reference_hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """post ⊙ Had_n^(T if transpose) (pre ⊙ x) along the last dim of x [..., n]."""
    if pre is not None:
        x = x * pre.to(x)
    y = orthogonal_op(x.shape[-1]).apply(x, transpose=transpose)
    return y * post.to(y) if post is not None else y
