"""Dense weights as a codebook: bf16 (16 bits) for the parts of a model that stay unquantized, and
float32 (32 bits) for a decoded copy held for evaluation.

Treating them as a codebook lets the embeddings, the output head and `keep_decoded` weights go
through the same layer, checkpoint and kernel dispatch as every quantized weight.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.errors import QuipkitError

DTYPES = {16: torch.bfloat16, 32: torch.float32}


@register_codebook("dense")
class Dense(Codebook):
    """Each weight stored as itself, rounded to bf16 (bits=16) or kept in float32 (bits=32)."""

    dim = 1

    def __init__(self, bits: int = 16) -> None:
        if bits not in DTYPES:
            raise QuipkitError(f"the dense codebook stores 16 (bf16) or 32 (float32) bits, got {bits}")
        super().__init__(bits)
        self.dtype = DTYPES[bits]

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "bits": self.bits}

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        values = block.to(self.dtype).float()
        return values, values

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        return codes.float()

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        return {"weight": codes.to(self.dtype).contiguous()}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        return stored["weight"], {}

    def dequantize_rows(self, stored: dict[str, Tensor], rows: int, cols: int, index: Tensor) -> Tensor:
        return stored["weight"][index].float()

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"weight": ((rows, cols), self.dtype)}
