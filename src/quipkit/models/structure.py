"""Find a model's decoder blocks and the linear layers to quantize, for any architecture.

Blocks are the longest `nn.ModuleList` whose members hold linear layers; linears are found by
module type and filtered by name patterns (regular expressions on the full module name). Nothing
here knows an architecture by name, so Llama, Qwen2, Mistral, Gemma and the next one all work.
"""

from __future__ import annotations

import re

from torch import nn

from quipkit.errors import QuipkitError


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_has_linear(b) for b in module):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise QuipkitError(
            "the model has no repeated blocks of linear layers to quantize "
            f"(found {sum(isinstance(m, nn.Linear) for m in model.modules())} linear layers outside any block)"
        )
    return best


def select_linears(
    block: nn.Module, prefix: str, include: tuple[str, ...] = (), exclude: tuple[str, ...] = ()
) -> dict[str, nn.Linear]:
    """{full name: linear} of the block's linears whose full name matches an include pattern
    (all, when none are given) and no exclude pattern, in module order."""
    chosen: dict[str, nn.Linear] = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        full = f"{prefix}.{name}"
        if include and not any(re.search(p, full) for p in include):
            continue
        if any(re.search(p, full) for p in exclude):
            continue
        chosen[full] = module
    return chosen


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted `name` under `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
