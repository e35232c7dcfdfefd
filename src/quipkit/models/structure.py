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


def _block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """{name: ModuleList} of lists whose members are blocks holding linears (not linears themselves, as an
    unfused experts module's per-expert lists are)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.ModuleList) and len(module) > 0
            and all(len(list(b.children())) > 0 and _has_linear(b) for b in module)}


def find_blocks(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the decoder blocks: `path` when given, else the longest list of
    blocks under the model's decoder (`get_decoder()`, so a vision-language model's text blocks and not
    its vision tower's), else the longest anywhere."""
    lists = _block_lists(model)
    if path is not None:
        if path not in lists:
            known = ", ".join(f"{name} ({len(m)})" for name, m in lists.items()) or "none"
            raise QuipkitError(f"--blocks {path} is not a list of blocks holding linear layers in this model; "
                               f"lists that are: {known}")
        return path, lists[path]
    if not lists:
        raise QuipkitError(
            "the model has no repeated blocks of linear layers to quantize "
            f"(found {sum(isinstance(m, nn.Linear) for m in model.modules())} linear layers outside any block)"
        )
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    prefix = next((name for name, m in model.named_modules() if m is decoder), None) if decoder is not None else None
    preferred = {n: m for n, m in lists.items() if prefix is not None and (prefix == "" or n.startswith(prefix + "."))}
    name = max(preferred or lists, key=lambda n: len(lists[n]))
    return name, lists[name]


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
