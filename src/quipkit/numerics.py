"""Checks over whole matrices that must not cost a copy of them.

`torch.isfinite` on a float matrix allocates about twice the matrix (an absolute-value copy and a
mask): for a 7B MLP's Hessian that was the peak of a step meant to be free.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHECK_ELEMENTS = 1 << 21  # elements per step of a check


def count_nonfinite(tensor: Tensor) -> int:
    """How many entries of `tensor` are NaN or Inf, a block of its first dim at a time."""
    if tensor.dim() < 2 or tensor.numel() <= CHECK_ELEMENTS:
        return int((~torch.isfinite(tensor)).sum())
    step = max(1, CHECK_ELEMENTS // tensor[0].numel())
    return sum(int((~torch.isfinite(part)).sum()) for part in tensor.split(step))
