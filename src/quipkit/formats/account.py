"""An honest account of a checkpoint: what share of the model's parameters were quantized, at how many
bits the quantized part and the whole model are stored, and which large weights stayed in float.

Computed from the checkpoint itself (the model skeleton on the meta device and the safetensors
header), so `quantize` and `info` report the same numbers and nothing is loaded. A model whose bulk
is not in `nn.Linear` modules (fused mixture-of-experts weights, say) would otherwise look like a
4-bit model while most of it is float.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

UNQUANTIZED_LIMIT = 0.1  # a warning above this share of non-embedding parameters left in float


@dataclass
class Account:
    parameters: int  # of the float model (tied tensors once)
    quantized: int  # weights of the quantized decoder linears
    embeddings: int  # the input embeddings and the output head
    quantized_bits: float  # bits per weight of the quantized linears, as stored
    model_bits: float  # bits per parameter of the whole checkpoint, as stored
    float_weights: list[tuple[str, int]] = field(default_factory=list)  # float non-embedding matrices, largest first
    unquantized: int = 0  # non-embedding parameters left in float (matrices, norms, biases)

    @property
    def share(self) -> float:
        """Quantized share of the non-embedding parameters."""
        return self.quantized / max(self.parameters - self.embeddings, 1)

    def warning(self) -> str | None:
        rest = self.unquantized / max(self.parameters - self.embeddings, 1)
        if rest <= UNQUANTIZED_LIMIT:
            return None
        named = ", ".join(f"{name} ({count:,})" for name, count in self.float_weights[:3])
        more = f" and {len(self.float_weights) - 3} more" if len(self.float_weights) > 3 else ""
        return (f"{rest:.0%} of the non-embedding parameters stayed in float, not quantized: {named}{more}; "
                "they are not nn.Linear layers of a decoder block (or were excluded)")

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "quantized_parameters": self.quantized,
                "embedding_parameters": self.embeddings, "quantized_share": self.share,
                "quantized_bits_per_weight": self.quantized_bits, "model_bits_per_parameter": self.model_bits,
                "float_weights": [[name, count] for name, count in self.float_weights]}


def checkpoint_account(folder: str | Path) -> Account:
    """The account of the checkpoint in `folder`, which is validated first."""
    from quipkit.formats.validate import inspect_checkpoint

    _, quant, model, header = inspect_checkpoint(folder)
    return account_of(model, header, quant)


def account_of(model: nn.Module, header: dict[str, dict[str, Any]], quant: dict[str, Any]) -> Account:
    """The account of a checkpoint from its model skeleton, its weights' safetensors header and its
    quantization_config (all three from `inspect_checkpoint`)."""
    bits_by_module: dict[str, int] = defaultdict(int)  # bits stored per module, biases aside
    for key, entry in header.items():
        if not key.endswith(".bias"):
            bits_by_module[key.rpartition(".")[0]] += (entry["data_offsets"][1] - entry["data_offsets"][0]) * 8
    stored = sum((e["data_offsets"][1] - e["data_offsets"][0]) * 8 for e in header.values())
    ends = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    decoders = set(quant["layers"]) - {quant.get("head")}
    parameters = embeddings = quantized = quantized_bits = unquantized = 0
    floats: list[tuple[str, int]] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        if hasattr(module, "codebook"):  # quantized: count the weight it stands for
            count = _weights(module)
            if not getattr(module, "tied", False):  # a tied embedding decodes the head's codes: counted there
                parameters += count
                embeddings += count if id(module) in ends else 0
            if name in decoders:
                quantized += count
                quantized_bits += bits_by_module[name]
        for key, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue  # a tied tensor: counted once
            seen.add(id(param))
            parameters += param.numel()
            if id(module) in ends:
                embeddings += param.numel()
                continue
            unquantized += param.numel()
            if param.dim() >= 2:
                floats.append((f"{name}.{key}" if name else key, param.numel()))
    floats.sort(key=lambda item: -item[1])
    return Account(parameters=parameters, quantized=quantized, embeddings=embeddings,
                   quantized_bits=quantized_bits / max(quantized, 1),
                   model_bits=stored / max(parameters, 1), float_weights=floats, unquantized=unquantized)


def _weights(module: nn.Module) -> int:
    """How many weights a quantized layer or embedding stands for."""
    if hasattr(module, "out_features"):
        return module.out_features * module.in_features
    return module.num_embeddings * module.embedding_dim
