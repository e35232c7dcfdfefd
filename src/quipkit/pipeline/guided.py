"""Guided Hessians (GuidedQuant): a Hessian per group of a layer's output rows, each token's x x^T
weighted by how much the model's loss moves with those outputs.

One forward and backward pass of the float model per calibration sequence, the loss being the
next-token cross-entropy against the float model's own most likely tokens (its predictions, so that
the rounding protects what the model does rather than the text's surprises). For every linear the
squared gradient with respect to its outputs is summed over each contiguous group of rows: [N, T, G]
weights per layer, which the Hessian hooks of the block walk multiply into x x^T token by token.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quipkit.console import Reporter

ROW_BLOCK = 16  # a group holds a multiple of this many rows: the trellis codebook's tile height
# Sequences per backward pass. A pass holds every activation of the model: 1.8 GB per 512-token
# sequence of the 135M reference model (measured), 14 GB for the calibration batch of 8; on the CPU
# one at a time costs no throughput (2.7 s per sequence either way).
BACKWARD_SEQUENCES = 1


def row_groups(rows: int, wanted: int) -> int:
    """The number of row groups of a layer with `rows` outputs: at most `wanted`, each a multiple of
    ROW_BLOCK rows, at least 1."""
    return next((g for g in range(wanted, 0, -1) if rows % (g * ROW_BLOCK) == 0), 1)


def output_gradient_weights(model: nn.Module, linears: dict[str, nn.Linear], tokens: Tensor, groups: int,
                            reporter: Reporter | None = None) -> dict[str, Tensor]:
    """{name: [N, T, G]} for `linears` of the float `model` on calibration `tokens` [N, T]: per token,
    the squared gradient of the loss with respect to the layer's outputs, summed over each of its G
    (`row_groups`) contiguous groups of rows."""
    reporter = reporter or Reporter()
    n, t = tokens.shape
    # filled in place, sequence by sequence: appending each pass's small results instead grew the
    # process by about 150 MB per sequence on the reference model (the heap could not shrink
    # under the long-lived pieces) and 128 sequences went past 24 GB
    found = {name: torch.zeros(n, t, row_groups(linear.out_features, groups)) for name, linear in linears.items()}
    rows = slice(0, 0)  # the sequences of the pass under way

    def hook(name: str):
        def keep(grad: Tensor) -> None:
            out = found[name][rows]
            out.copy_(grad.detach().float().pow(2).reshape(*out.shape, -1).sum(-1))

        def watch(module: nn.Module, inputs, output: Tensor) -> None:
            if output.requires_grad:
                output.register_hook(keep)

        return watch

    handles = [linear.register_forward_hook(hook(name)) for name, linear in linears.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients of the activations only
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad(), reporter.task("guided Hessians: gradients", len(tokens)) as task:
            for start in range(0, n, BACKWARD_SEQUENCES):
                batch = tokens[start : start + BACKWARD_SEQUENCES]
                rows = slice(start, start + len(batch))
                inputs = embed(batch.to(device)).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, use_cache=False).logits
                predictions = logits.detach().argmax(-1)
                nn.functional.cross_entropy(logits.flatten(0, 1).float(), predictions.flatten(), reduction="sum").backward()
                task.advance(len(batch))
    finally:
        for handle in handles:
            handle.remove()
        for p in trainable:
            p.requires_grad_(True)
    return found
