"""QuantizedEmbedding: token embeddings held in a compact number format and decoded row by row.

The embedding of a model with tied input and output embeddings reads the output head's stored
tensors (`tied_to`), so the checkpoint and memory hold that matrix once, as llama.cpp does with
its token embeddings. Lookups decode only the rows asked for, in `dtype` (float32 unless the model
was cast or loaded in another dtype).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from quipkit.codebooks import make_codebook
from quipkit.layers.stored_formats import KeepsStoredFormats


class QuantizedEmbedding(KeepsStoredFormats):
    def __init__(self, num_embeddings: int, embedding_dim: int, codebook: dict[str, Any], tied: bool = False,
                 dtype: str = "float32") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.codebook = make_codebook(codebook)
        self.tied = tied
        self.dtype = getattr(torch, dtype)
        self._names = tuple(self.codebook.storage(num_embeddings, embedding_dim))
        self._head: nn.Module | None = None  # the output head whose tensors a tied embedding reads
        if not tied:
            for name, (shape, dt) in self.codebook.storage(num_embeddings, embedding_dim).items():
                self.register_buffer(name, torch.empty(shape, dtype=dt))  # filled before use: untouched till then

    def _apply(self, fn, recurse: bool = True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # lookups follow the model's casts (.to(bf16))
        return super()._apply(fn, recurse)

    def tie_to(self, head: nn.Module) -> None:
        """Read the stored tensors of `head` (a QuantizedLinear with the same codebook and shape)."""
        object.__setattr__(self, "_head", head)  # not a submodule: the head belongs to the model once

    def stored(self) -> dict[str, Tensor]:
        source = self._head if self.tied else self
        if source is None:
            raise RuntimeError("this tied embedding has no output head to read; call tie_to(head)")
        return {name: getattr(source, name) for name in self._names}

    def spec(self) -> dict[str, Any]:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "codebook": self.codebook.spec(), "tied": self.tied,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def forward(self, ids: Tensor) -> Tensor:
        """ids [...] -> embeddings [..., embedding_dim]."""
        rows = self.codebook.dequantize_rows(self.stored(), self.num_embeddings, self.embedding_dim, ids.reshape(-1))
        return rows.to(self.dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        spec = self.codebook.spec()
        return (f"{self.num_embeddings}, {self.embedding_dim}, codebook={spec['name']}, bits={spec['bits']}, "
                f"tied={self.tied}")
