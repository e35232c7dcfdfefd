"""The Codebook interface: what one rounding step maps a block of weight columns to.

A codebook is a pure object (no nn.Module, no state). The rounder hands it `dim` columns of a
weight matrix at a time; the codebook returns integer codes and the values they decode to. A
vector codebook (E8P) treats each row's `dim` weights as one vector; the trellis codes a tile
across rows. Per-matrix parameters (group scales, zero points) come from `fit` and travel as
tensors, so a layer can keep them as buffers and move them between devices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from quipkit.errors import QuipkitError

Params = dict[str, Tensor]


class Codebook(ABC):
    """A number format for weights. Subclasses register themselves under `name`."""

    name: ClassVar[str]
    #: Columns of W rounded together in one step (1 scalar, 8 E8P, 16 trellis).
    dim: int = 1
    #: Rows that belong together (16 for trellis tiles); row counts must be multiples of it.
    row_block: int = 1
    #: RMS the rounder normalises W to before rounding; None when the codebook scales itself.
    target_rms: float | None = None

    def __init__(self, bits: int) -> None:
        self.bits = bits

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """JSON-able description; `make_codebook(spec)` rebuilds an equal codebook."""

    def check_shape(self, rows: int, cols: int) -> None:
        """Raise a clear error when a weight of this shape cannot use this codebook."""
        if cols % self.dim or rows % self.row_block:
            raise QuipkitError(
                f"codebook '{self.name}' needs in_features divisible by {self.dim} and out_features "
                f"divisible by {self.row_block}; got a {rows}x{cols} weight (exclude the layer or pick another method)"
            )

    def for_columns(self, cols: int) -> "Codebook":
        """The codebook a weight with `cols` input features gets: this one, or a stand-in of the same
        family where this one cannot take that row length (llama.cpp's k-quants need rows in 256s)."""
        return self

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """Per-matrix parameters for `weight` [m, n]; every tensor's first dim is m (rows split cleanly).
        `importance` [n]: what an error in each column costs (the Hessian's diagonal; None: all alike),
        for codebooks whose parameters are searched."""
        return {}

    def refit(self, codes: Tensor, params: Params, weight: Tensor, hessian: Tensor) -> Params:
        """Parameters fit again to the rounded `codes` of `weight` [m, n] through `hessian` [n, n], for a
        codebook whose values are linear in its parameters; the same object when there is nothing to fit."""
        return params

    @abstractmethod
    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        """Round `block` [m, dim] (columns `cols` [dim] of the matrix) -> (codes [m / row_block, 1, ...], values [m, dim])."""

    @abstractmethod
    def decode(self, codes: Tensor, params: Params) -> Tensor:
        """Codes of a whole matrix [m / row_block, n / dim, ...] -> values [m, n] (float32)."""

    @abstractmethod
    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        """Codes and params -> compact storage tensors (what the layer and checkpoint hold)."""

    @abstractmethod
    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        """Inverse of `pack` for a rows x cols weight."""

    @abstractmethod
    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every tensor `pack` returns for a rows x cols weight."""

    def packed_spec(self, stored: dict[str, Tensor]) -> dict[str, Any]:
        """The spec of the layer that holds `stored` (what `pack` gave): `spec()`, plus whatever sizes
        depend on the weight itself (an index code's length) for a codebook whose storage varies."""
        return self.spec()

    def upgrade(self, stored: dict[str, Tensor], version: int) -> dict[str, Tensor]:
        """Stored tensors written by checkpoint format `version` -> the current layout (default: unchanged)."""
        return stored

    def dequantize(self, stored: dict[str, Tensor], rows: int, cols: int) -> Tensor:
        """Stored tensors -> weight values [rows, cols] (float32), the reference decode path."""
        codes, params = self.unpack(stored, rows, cols)
        return self.decode(codes, params)

    def dequantize_rows(self, stored: dict[str, Tensor], rows: int, cols: int, index: Tensor) -> Tensor:
        """Rows `index` [k] of the weight -> [k, cols] (float32): an embedding lookup. Codebooks used for
        embeddings decode only those rows; this fallback decodes the whole matrix."""
        return self.dequantize(stored, rows, cols)[index]


def split_rows(tensors: dict[str, Tensor], sizes: list[int], row_block: int) -> list[dict[str, Tensor]]:
    """Split per-row tensors (codes or params, first dim in units of `row_block` rows) into parts."""
    parts: list[dict[str, Tensor]] = [{} for _ in sizes]
    for key, value in tensors.items():
        chunks = torch.split(value, [s // row_block for s in sizes], dim=0)
        for part, chunk in zip(parts, chunks):
            part[key] = chunk.contiguous()
    return parts
