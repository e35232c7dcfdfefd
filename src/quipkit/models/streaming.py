"""A float model whose weights stay on disk until a part of it is needed.

The model is built on the meta device from its config.json (parameters have shapes, no memory;
buffers such as rotary frequencies are real), and `materialize(prefix)` fills one submodule (a
decoder block, the embeddings) from the memory-mapped safetensors files in float32 for the math;
`release(prefix)` returns it to meta. Peak memory is then what is materialized, not the model.

This works when the model's parameter names are the files' tensor names (a tied head may be absent);
a model that transformers renames or fuses while loading (some vision-language and mixture-of-experts
checkpoints) is loaded whole instead: `open_streamed` returns None and says why.
"""

from __future__ import annotations

import hashlib
from typing import Any
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from quipkit.errors import QuipkitError
from quipkit.formats.checkpoint import WEIGHTS
from quipkit.formats.validate import shard_map
from quipkit.models.experts import find_fused_experts


def weight_files(folder: Path) -> dict[str, Path] | None:
    """{tensor name: file} of a Hugging Face folder's safetensors weights, or None when it has none."""
    weight_map = shard_map(folder)
    if weight_map is not None:
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / WEIGHTS
    if not single.is_file():
        return None
    with safe_open(str(single), "pt") as handle:
        return {name: single for name in handle.keys()}


class StreamedModel:
    """The meta skeleton of a float model and the files its weights are read from, part by part."""

    def __init__(self, model: nn.Module, files: dict[str, Path], dtype: torch.dtype) -> None:
        self.model = model
        self.files = files
        self.dtype = dtype
        self.tied_head = _tied_head(model)  # the head's weight name when it is the embeddings' matrix

    def materialize(self, prefix: str = "", outside: tuple[str, ...] = ()) -> nn.Module:
        """Fill the submodule at `prefix` ('' for the model) with its weights from disk, float tensors in
        the model's dtype, leaving what lies under the modules named in `outside` on meta; returns it."""
        module = self.model.get_submodule(prefix) if prefix else self.model
        head = f"{prefix}." if prefix else ""
        # files opened for this call only: an open file's pages that were read count as this process's memory
        handles: dict[Path, Any] = {}
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            full = head + name
            if not tensor.is_meta or any(full.startswith(skip + ".") for skip in outside):
                continue
            if full not in self.files:
                if full == self.tied_head:
                    continue  # read through the embeddings it is tied to
                raise QuipkitError(f"the model's files lack '{full}'; restore the model's files")
            path = self.files[full]
            if path not in handles:
                handles[path] = safe_open(str(path), "pt")
            value = handles[path].get_tensor(full)
            value = value.to(self.dtype, copy=True) if value.is_floating_point() else value.clone()
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
            else:
                owner._buffers[leaf] = value
        if not prefix:
            self.model.tie_weights()  # a tied head holds the embeddings' new tensor, not the meta one
        return module

    def ends(self) -> tuple[str, str | None]:
        """(the input embeddings' name, the output head's name or None when it is tied to them)."""
        embeddings, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        names = {id(module): name for name, module in self.model.named_modules()}
        return names[id(embeddings)], None if head is None or self.tied_head else names[id(head)]

    def release(self, prefix: str) -> None:
        """Return the submodule at `prefix` to the meta device (its memory is freed)."""
        self.model.get_submodule(prefix).to("meta")

    def release_outside(self, blocks: str) -> None:
        """Return the weights read from disk outside `blocks` to meta; computed buffers (rotary) stay."""
        for name, module in self.model.named_modules():
            if name == blocks or name.startswith(blocks + "."):
                continue
            head = f"{name}." if name else ""
            for table in (module._parameters, module._buffers):
                for key, tensor in table.items():
                    if tensor is not None and not tensor.is_meta and (head + key in self.files
                                                                      or head + key == self.tied_head):
                        meta = tensor.to("meta")
                        table[key] = nn.Parameter(meta, requires_grad=False) if table is module._parameters else meta

    def signature(self) -> str:
        """A fingerprint of the weights without reading them all: each file's size, header and a sample
        of its bytes at 16 places, so another model under the same name never resumes this one's run."""
        digest = hashlib.sha256()
        for path in sorted(set(self.files.values())):
            size = path.stat().st_size
            digest.update(f"{path.name}:{size}".encode())
            with open(path, "rb") as handle:
                for place in range(16):
                    handle.seek(size * place // 16)
                    digest.update(handle.read(4096))
        return digest.hexdigest()[:16]


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary) computed
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def open_streamed(folder: str | Path, dtype: torch.dtype = torch.float32) -> tuple[StreamedModel | None, str]:
    """(the model streamed from `folder`, '') when its weights can be read part by part, else (None, why)."""
    folder = Path(folder)
    files = weight_files(folder)
    if files is None:
        return None, "it has no safetensors weights"
    try:
        model = _skeleton(folder, dtype)
    except Exception as err:  # transformers raises many types for a config it cannot build
        return None, f"its config does not build a model on the meta device ({type(err).__name__})"
    if find_fused_experts(model):
        return None, "its experts are fused in memory"
    names = set(model.state_dict())
    missing = sorted(names - set(files) - {_tied_head(model)})
    if missing:
        return None, f"its files name tensors differently from the model ('{missing[0]}' is not in them)"
    return StreamedModel(model, files, dtype), ""


def _tied_head(model: nn.Module) -> str | None:
    """The output head's weight name when the config ties it to the input embeddings (then the files
    may lack it: it is read through the embeddings), else None."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if head is None or not getattr(config, "tie_word_embeddings", False):
        return None
    return next((f"{prefix}.weight" for prefix, module in model.named_modules() if module is head), None)
