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
# sequence of the 135M reference model (measured), so the calibration batch of 8 went past 24 GB;
# on the CPU one at a time costs no throughput (2.7 s per sequence either way).
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
    found: dict[str, list[Tensor]] = {name: [] for name in linears}

    def hook(name: str, count: int):
        def keep(module: nn.Module, grad_input, grad_output) -> None:
            grad = grad_output[0].detach().float()
            found[name].append(grad.pow(2).reshape(*grad.shape[:-1], count, -1).sum(-1).cpu())

        return keep

    handles = [linear.register_full_backward_hook(hook(name, row_groups(linear.out_features, groups)))
               for name, linear in linears.items()]
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)  # gradients of the activations only
    device = next(model.parameters()).device
    embed = model.get_input_embeddings()
    try:
        with torch.enable_grad(), reporter.task("guided Hessians: gradients", len(tokens)) as task:
            for batch in torch.split(tokens, BACKWARD_SEQUENCES):
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
    return {name: torch.cat(parts) for name, parts in found.items()}
