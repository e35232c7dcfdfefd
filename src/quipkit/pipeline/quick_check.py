"""The quick perplexity check, computed while the blocks are quantized.

A few short WikiText-2 windows travel through the walk twice: through each float block before it is
quantized, and through the same block after. At the end, the final norm and the head turn both into
logits: the float and the quantized model's perplexity, without ever holding either whole model (a
streamed 70B model gets its check at the cost of a few hundred tokens per block). The numbers are
those of a full forward of either model (the quantized side starts from the embedding rows as they
will be stored, bf16; where they become a quantized head's rows, tied at 8/6/4 bits, from the float
ones, a close approximation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from quipkit.eval.perplexity import Protocol, protocol_windows, window_nll
from quipkit.pipeline.capture import logits_after_blocks, run_block


class QuickCheck:
    """Two streams of the check's windows: through the float blocks and through the quantized ones."""

    def __init__(self, tokenizer, proto: Protocol) -> None:
        self.protocol = proto
        self.batches = list(torch.split(protocol_windows(tokenizer, proto), 1))  # [1, T] each
        self.float: list[Tensor] = []  # hidden states [1, T, d] after the float blocks so far
        self.quantized: list[Tensor] = []  # the same after the quantized blocks
        self.result: dict[str, float] = {}

    def start(self, float_inputs: list[Tensor], quantized_inputs: list[Tensor]) -> None:
        """The streams begin at block 0's inputs from the float and from the quantized embeddings."""
        self.float, self.quantized = list(float_inputs), list(quantized_inputs)

    def before(self, block: nn.Module, kwargs: list[dict], device: torch.device) -> None:
        """Pass the float stream through `block` before it is quantized."""
        self.float = run_block(block, self.float, kwargs, device)

    def after(self, block: nn.Module, kwargs: list[dict], device: torch.device) -> None:
        """Pass the quantized stream through `block` once it is quantized."""
        self.quantized = run_block(block, self.quantized, kwargs, device)

    def state(self) -> dict[str, Tensor]:
        """Both streams, for a resumable run to store."""
        return {**{f"check_float_{i}": x for i, x in enumerate(self.float)},
                **{f"check_quantized_{i}": x for i, x in enumerate(self.quantized)}}

    def restore(self, stored: dict[str, Tensor]) -> None:
        self.float = [stored[f"check_float_{i}"] for i in range(len(self.batches))]
        self.quantized = [stored[f"check_quantized_{i}"] for i in range(len(self.batches))]

    def _perplexity(self, model: nn.Module, blocks: nn.ModuleList, finals: list[Tensor], returns_tuple: bool) -> float:
        logits = logits_after_blocks(model, blocks, self.batches, finals, returns_tuple)
        total = sum(window_nll(out, batch) for out, batch in zip(logits, self.batches))
        return math.exp(total / sum(batch[:, 1:].numel() for batch in self.batches))

    def finish_float(self, model: nn.Module, blocks: nn.ModuleList, returns_tuple: bool) -> None:
        """The float model's perplexity; call while the model's head and final norm are still float."""
        self.result["float"] = self._perplexity(model, blocks, self.float, returns_tuple)

    def finish_quantized(self, model: nn.Module, blocks: nn.ModuleList, returns_tuple: bool) -> None:
        """The quantized model's perplexity; call once its head is in place."""
        self.result["quantized"] = self._perplexity(model, blocks, self.quantized, returns_tuple)
