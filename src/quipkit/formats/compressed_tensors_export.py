"""Export a checkpoint of a scalar-grid method (rtn, gptq) to compressed-tensors' pack-quantized format,
which vLLM serves and transformers loads (with the `compressed-tensors` package).

Our grid is compressed-tensors' integer grid shifted by 2^(b-1): w = scale (code - zero) with code
and zero in [0, 2^b) is w = scale (q - zp) with q = code - 2^(b-1), zp = zero - 2^(b-1), and their
packing stores q + 2^(b-1) = code. So the codes, fp16 scales and zero points are written as they are
(no re-rounding; the fp16 scales in float32): the export computes exactly what quipkit computes.
Codes are packed along rows, 32 / b to an int32 from the low bits up (quipkit's own bit stream read
as little-endian words); zero points the same way along the output dimension.
The output head, embeddings and norms are written dense, as held.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from quipkit.errors import QuipkitError
from quipkit.layers.packing import pack_bits

BITS = (4, 8)  # the integer widths vLLM's kernels serve
COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
          "chat_template.jinja")


def pack_int32(values: Tensor, bits: int) -> Tensor:
    """Unsigned `bits`-bit values [r, c] (c a multiple of 32 / bits) -> int32 [r, c * bits / 32], value j
    of each word in bits j*b .. j*b + b - 1: quipkit's own little-endian bit stream, read as words."""
    return pack_bits(values, bits).view(torch.int32)


def _scheme(codebook) -> dict[str, Any]:
    return {"num_bits": codebook.bits, "type": "int", "symmetric": codebook.symmetric, "strategy": "group",
            "group_size": codebook.group_size, "dynamic": False, "actorder": None}


def _layer_tensors(name: str, layer) -> dict[str, Tensor]:
    """The pack-quantized tensors of one QuantizedLinear on the scalar grid."""
    codebook, rows, cols = layer.codebook, layer.out_features, layer.in_features
    codes, params = codebook.unpack(layer.codebook_tensors(), rows, cols)
    out = {f"{name}.weight_packed": pack_int32(codes, codebook.bits),
           f"{name}.weight_scale": params["scale"].float(),  # fp16 values, in float32: a dequantizing load stays exact
           f"{name}.weight_shape": torch.tensor([rows, cols])}
    if not codebook.symmetric:
        out[f"{name}.weight_zero_point"] = pack_int32(params["zero"].t(), codebook.bits).t().contiguous()
    if layer.bias is not None:
        out[f"{name}.bias"] = layer.bias.detach().clone()
    return out


def _check(name: str, layer) -> None:
    from quipkit.codebooks.scalar import GroupGrid

    codebook = layer.codebook
    if not isinstance(codebook, GroupGrid) or layer.transform.name != "identity" or layer.low_rank is not None:
        raise QuipkitError(f"compressed-tensors cannot express {name} ({codebook.name}, {layer.transform.name} "
                           "transform); it takes rtn and gptq (without --incoherence or --outlier-ratio): quantize "
                           "with one of them to export to compressed-tensors, or use GGUF for gguf-* methods")
    if codebook.bits not in BITS:
        raise QuipkitError(f"{name} has {codebook.bits}-bit codes; vLLM serves {' and '.join(map(str, BITS))}-bit "
                           "integer weights: quantize with --bits 4 or 8")
    if layer.in_features % codebook.group_size:
        raise QuipkitError(f"{name} ({layer.out_features}x{layer.in_features}) is not a whole number of groups of "
                           f"{codebook.group_size}; quantize with a --group-size that divides {layer.in_features}")
    per = 32 // codebook.bits
    if layer.in_features % per or layer.out_features % per:
        raise QuipkitError(f"{name} ({layer.out_features}x{layer.in_features}) does not pack into int32 words of "
                           f"{per} {codebook.bits}-bit values; exclude it (--exclude) to export the rest")


def export_compressed_tensors(folder: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False,
                              log: Callable[[str], None] = print) -> Path:
    """Write the folder `out` (config.json, model.safetensors, the tokenizer) from the quipkit checkpoint in
    `folder`; returns its path."""
    from quipkit.formats.atomic import atomic_save_tensors
    from quipkit.formats.checkpoint import _publish, load, read_quantization_config
    from quipkit.layers.quantized_embedding import QuantizedEmbedding
    from quipkit.layers.quantized_linear import QuantizedLinear

    folder, out = Path(folder), Path(out)
    config, quant = read_quantization_config(folder)
    if quant.get("experts"):
        raise QuipkitError(f"{folder} has fused mixture-of-experts weights, which this export does not write yet")
    model, _ = load(folder)
    head = model.get_output_embeddings()
    tensors: dict[str, Tensor] = {}
    groups: dict[str, dict[str, Any]] = {}
    dense: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module is not head:
            _check(name, module)
            tensors.update(_layer_tensors(name, module))
            key = json.dumps(_scheme(module.codebook), sort_keys=True)
            groups.setdefault(key, {"targets": [], "weights": _scheme(module.codebook)})["targets"].append(name)
        elif isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
            weight = module.effective_weight() if isinstance(module, QuantizedLinear) else \
                module(torch.arange(module.num_embeddings)).float()
            tensors[f"{name}.weight"] = _as_held(weight)
            if getattr(module, "bias", None) is not None:
                tensors[f"{name}.bias"] = module.bias.detach().clone()
            dense.append(name)
    inside = tuple(f"{name}." for name in dense) + tuple(f"{t}." for g in groups.values() for t in g["targets"])
    for key, tensor in model.state_dict().items():
        if not key.startswith(inside):
            tensors.setdefault(key, tensor.detach().clone())
    if config.get("tie_word_embeddings") and head is not None:
        head_name = next(name for name, m in model.named_modules() if m is head)
        tensors.pop(f"{head_name}.weight", None)  # transformers ties it to the embeddings again
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": {**group, "input_activations": None, "output_activations": None,
                                         "format": "pack-quantized"} for i, group in enumerate(groups.values())},
        "ignore": [name for name, m in model.named_modules() if isinstance(m, nn.Linear) or m is head],
        "kv_cache_scheme": None,
    }

    def write(tmp: Path) -> None:
        atomic_save_tensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for copied in COPIED:
            if (folder / copied).is_file():
                shutil.copyfile(folder / copied, tmp / copied)

    log(f"{sum(len(g['targets']) for g in groups.values())} quantized linears in {len(groups)} scheme(s), "
        f"{len(dense)} dense")
    return _publish(out, overwrite, write)


def _as_held(weight: Tensor) -> Tensor:
    """A float weight in bf16 when that holds it exactly (a bf16 head), else float32."""
    bf16 = weight.to(torch.bfloat16)
    return bf16 if torch.equal(bf16.float(), weight.float()) else weight.float().clone()
