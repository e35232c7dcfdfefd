"""A low-rank term L R of a layer's weight, each factor stored in a number format of its own (CALDERA).

The term lives where the layer's codes do (after the incoherence transform, in the codes' scale), so
the layer computes transform.output((decode(codes) + L R) x_t). L [m, k] is stored as an m x k
matrix of the factor codebook, R [k, n] as a k x n one; their tensors are the layer's, prefixed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Params
from quipkit.codebooks.registry import make_codebook
from quipkit.errors import QuipkitError

LEFT, RIGHT = "lr_left_", "lr_right_"


class LowRank:
    """Rank-`rank` factors L [m, k] and R [k, n] in the factor codebook `codebook` (a spec)."""

    def __init__(self, rank: int, codebook: dict[str, Any]) -> None:
        if not isinstance(rank, int) or rank < 1:
            raise QuipkitError(f"the low-rank term needs a rank >= 1, got {rank!r}")
        self.rank = rank
        self.codebook = make_codebook(codebook)
        if self.codebook.dim != 1 or self.codebook.row_block != 1 or self.codebook.target_rms is not None:
            raise QuipkitError(f"low-rank factors need a scalar codebook that scales itself (scalar, dense), "
                               f"not '{self.codebook.name}'")

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank, "codebook": self.codebook.spec()}

    def check_shape(self, rows: int, cols: int) -> None:
        if self.rank > min(rows, cols):
            raise QuipkitError(f"rank {self.rank} is larger than a {rows}x{cols} weight allows (at most "
                               f"{min(rows, cols)}); lower --rank")
        self.codebook.check_shape(rows, self.rank)
        self.codebook.check_shape(self.rank, cols)

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shapes and dtypes of the stored tensors of both factors, under their prefixed names."""
        return _joined(self.codebook.storage(rows, self.rank), self.codebook.storage(self.rank, cols))

    def names(self, rows: int, cols: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The stored names of L's tensors and of R's, each in its codebook's storage order (the order the
        decode kernels read them in)."""
        return (tuple(LEFT + k for k in self.codebook.storage(rows, self.rank)),
                tuple(RIGHT + k for k in self.codebook.storage(self.rank, cols)))

    def pack(self, left: tuple[Tensor, Params], right: tuple[Tensor, Params]) -> dict[str, Tensor]:
        """(codes, params) of L and of R -> the stored tensors."""
        return _joined(self.codebook.pack(*left), self.codebook.pack(*right))

    def factors(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Tensor]:
        """The stored tensors (a layer's, others' ignored) -> (L [rows, k], R [k, cols]), float32."""
        left, right = _split(stored)
        return (self.codebook.dequantize(left, rows, self.rank), self.codebook.dequantize(right, self.rank, cols))

    def unpacked(self, stored: dict[str, Tensor], rows: int,
                 cols: int) -> tuple[tuple[Tensor, Params], tuple[Tensor, Params]]:
        """The stored tensors (a layer's, others' ignored) -> (codes, params) of L [rows, k] and of R [k, cols]:
        `pack`'s inverse."""
        left, right = _split(stored)
        return self.codebook.unpack(left, rows, self.rank), self.codebook.unpack(right, self.rank, cols)


def _split(stored: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """L's tensors and R's, their prefixes taken off."""
    return tuple({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)} for prefix in (LEFT, RIGHT))


def _joined(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    """L's entries and R's under their prefixed names."""
    return {**{LEFT + k: v for k, v in left.items()}, **{RIGHT + k: v for k, v in right.items()}}
