"""Round to nearest: every block independently, no feedback. The baseline every method must beat."""

from __future__ import annotations

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params


def round_nearest(weight: Tensor, codebook: Codebook, params: Params) -> tuple[Tensor, Tensor]:
    """W [m, n] -> (codes [m / row_block, n / dim, ...], Ŵ [m, n]), all column blocks in one call."""
    cols = torch.arange(weight.shape[1], device=weight.device)
    return codebook.quantize(weight.float(), params, cols)
