"""Export a checkpoint quantized with a gguf-* method to a GGUF file that stock llama.cpp runs.

The quantized layers' stored bytes are already GGML's blocks, so they are copied as they are (the
rows of q_proj and k_proj reordered as llama.cpp's converter does for its rotary layout: rows are
independent, so whole block rows move). Everything else is written as llama.cpp's converter would:
norms in float32, bf16 embeddings and head in BF16 (a head tied to the embeddings once, as
token_embd), the architecture's hyperparameters, and the tokenizer: copied from a GGUF (the one the
model came from, or `--tokenizer-from`), or converted from the checkpoint's byte-level BPE
tokenizer.json. The file is written beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from quipkit.errors import QuipkitError

# HF model_type -> (GGUF architecture, whether q/k rows are reordered for llama.cpp's rotary layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}
# per-block module -> GGUF tensor name (without "blk.N." and ".weight"/".bias")
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def _ggml_types() -> dict[str, Any]:
    from gguf import GGMLQuantizationType, LlamaFileType

    return {"q4_0": (GGMLQuantizationType.Q4_0, LlamaFileType.MOSTLY_Q4_0),
            "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
            "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
            "iq4_nl": (GGMLQuantizationType.IQ4_NL, LlamaFileType.MOSTLY_IQ4_NL),
            "q4_k": (GGMLQuantizationType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
            "q3_k": (GGMLQuantizationType.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
            "q2_k": (GGMLQuantizationType.Q2_K, LlamaFileType.MOSTLY_Q2_K)}


def gguf_name(name: str) -> str:
    """The GGUF name of a model tensor ('model.layers.3.mlp.down_proj.weight' -> 'blk.3.ffn_down.weight')."""
    module, _, kind = name.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{kind}"
    parts = module.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in BLOCK_NAMES:
        return f"blk.{parts[2]}.{BLOCK_NAMES['.'.join(parts[3:])]}.{kind}"
    raise QuipkitError(f"'{name}' has no place in a llama.cpp model; this architecture cannot be exported to GGUF")


def rotary_rows(rows: Tensor, heads: int) -> Tensor:
    """The rows [m, ...] of q_proj or k_proj (with `heads` heads) in llama.cpp's rotary order: within each
    head, the two halves HF rotates against each other interleaved."""
    m = rows.shape[0]
    return rows.reshape(heads, 2, m // heads // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


EMBEDDINGS = ("q8_0", "bf16")  # how bf16 embeddings and head are written: llama.cpp's choice for 4-bit files, or as held


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, tokenizer_from: str | os.PathLike | None = None,
                log: Callable[[str], None] = print, embeddings: str = "q8_0") -> Path:
    """Write `out` (a .gguf file) from the quipkit checkpoint in `folder`; returns its path. `embeddings`:
    "q8_0" rounds the bf16 embeddings and head to llama.cpp's Q8_0 (as llama-quantize does for a 4-bit
    file; 8.5 bits), "bf16" writes them as quipkit holds them."""
    import gguf

    from quipkit.codebooks.ggml_blocks import FORMATS, K_FORMATS, GgmlBlocks
    from quipkit.formats.checkpoint import load, read_quantization_config
    from quipkit.layers.quantized_embedding import QuantizedEmbedding
    from quipkit.layers.quantized_linear import QuantizedLinear

    folder, out = Path(folder), Path(out)
    config, _ = read_quantization_config(folder)
    model_type = config.get("model_type")
    if embeddings not in EMBEDDINGS:
        raise QuipkitError(f"embeddings must be one of {', '.join(EMBEDDINGS)}, got '{embeddings}'")
    if model_type not in ARCHITECTURES:
        raise QuipkitError(f"GGUF export supports {', '.join(ARCHITECTURES)} models; {folder} is '{model_type}'")
    arch, reorder = ARCHITECTURES[model_type]
    model, _ = load(folder)
    types = _ggml_types()
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    presets = ", ".join("gguf-" + kind for kind in (*FORMATS, *K_FORMATS))
    unreadable = [f"{name} ({m.codebook.name})" for name, m in blocks.items()
                  if not isinstance(m.codebook, GgmlBlocks) and not (m.codebook.name == "dense" and name == "lm_head")]
    if unreadable:
        fix = ("keep the head in bf16 (--head-bits 16)" if unreadable[0].startswith("lm_head ") else
               f"GGUF takes {presets}: quantize with one of them")
        raise QuipkitError(f"llama.cpp cannot read {unreadable[0]}{' and others' if len(unreadable) > 1 else ''}; "
                           f"{fix} to export to GGUF")
    formats = {m.codebook.type for m in blocks.values() if isinstance(m.codebook, GgmlBlocks)}
    if not formats:
        raise QuipkitError(f"{folder} has no layer in a llama.cpp format; quantize with one of "
                           f"{presets} to export to GGUF")
    main = max(formats, key=lambda t: sum(1 for m in blocks.values() if getattr(m.codebook, "type", None) == t))

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    _hyperparameters(writer, config)
    writer.add_file_type(types[main][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _tokenizer(writer, folder, config, tokenizer_from, log)

    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    embedding = model.get_input_embeddings()
    tied = bool(config.get("tie_word_embeddings")) or bool(getattr(embedding, "tied", False))
    for name, module in model.named_modules():
        if name == "lm_head" and tied:
            continue  # llama.cpp reads token_embd for a missing output
        if isinstance(module, QuantizedLinear):
            if isinstance(module.codebook, GgmlBlocks):
                data = _rows(module.codebook_tensors()["blocks"], name, reorder, heads, kv_heads)  # whole block rows
                writer.add_tensor(gguf_name(name + ".weight"), data.contiguous().numpy(),
                                  raw_dtype=types[module.codebook.type][0])
            else:
                _add_embedding(writer, gguf_name(name + ".weight"), module.effective_weight(), embeddings)
            if module.bias is not None:
                _add_float(writer, gguf_name(name + ".bias"), _rows(module.bias.detach(), name, reorder, heads, kv_heads))
        elif isinstance(module, QuantizedEmbedding):
            weight = module(torch.arange(module.num_embeddings)).float()
            _add_embedding(writer, gguf_name(name + ".weight"), weight, embeddings)
        elif isinstance(module, (nn.Embedding, nn.Linear)) or "norm" in name.rpartition(".")[2]:
            for key, tensor in module.named_parameters(recurse=False):
                tensor = _rows(tensor.detach(), name, reorder, heads, kv_heads) if key == "weight" else tensor.detach()
                _add_float(writer, gguf_name(f"{name}.{key}"), tensor if tensor.ndim > 1 else tensor.float())
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _rows(tensor: Tensor, name: str, reorder: bool, heads: int, kv_heads: int) -> Tensor:
    """A q/k projection's rows (float, bias or stored blocks) in llama.cpp's rotary order; any other as it is."""
    if reorder and name.endswith(("q_proj", "k_proj")):
        return rotary_rows(tensor, heads if name.endswith("q_proj") else kv_heads)
    return tensor


def _add_embedding(writer, name: str, weight: Tensor, embeddings: str) -> None:
    """Embeddings or head [rows, cols] (float32 values of bf16 ones): llama.cpp's Q8_0 of them (its own
    rounding) when asked and the rows allow, else BF16."""
    from gguf import GGMLQuantizationType, quants

    from quipkit.codebooks.ggml_blocks import BLOCK

    if embeddings == "q8_0" and weight.shape[1] % BLOCK == 0:
        blocks = quants.quantize(weight.detach().cpu().float().numpy(), GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, blocks, raw_dtype=GGMLQuantizationType.Q8_0)
    else:
        _add_float(writer, name, weight.to(torch.bfloat16))


def _add_float(writer, name: str, tensor: Tensor) -> None:
    """A float tensor as llama.cpp stores it: bf16 as BF16, anything else as F32 (1-d tensors always F32)."""
    from gguf import GGMLQuantizationType

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16 and tensor.ndim > 1:
        writer.add_tensor(name, tensor.view(torch.int16).numpy().view(np.uint16), raw_dtype=GGMLQuantizationType.BF16)
    else:
        writer.add_tensor(name, tensor.float().numpy())


def _hyperparameters(writer, config: dict[str, Any]) -> None:
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise QuipkitError(f"GGUF export does not write rope scaling '{kind}' yet; this model cannot be exported")
    heads = config["num_attention_heads"]
    writer.add_name(config.get("_name_or_path") or config["model_type"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_vocab_size(config["vocab_size"])


def _tokenizer(writer, folder: Path, config: dict[str, Any], source: str | os.PathLike | None,
               log: Callable[[str], None]) -> None:
    """tokenizer.* keys: copied from the GGUF `source` (or the one the checkpoint was made from), else
    converted from the checkpoint's tokenizer.json."""
    if source is None:
        report = folder / "quipkit_report.json"
        origin = json.loads(report.read_text()).get("source", {}) if report.is_file() else {}
        if origin.get("kind") == "gguf" and Path(origin["location"], origin["gguf_file"]).is_file():
            source = Path(origin["location"], origin["gguf_file"])
    if source is not None:
        _copy_tokenizer(writer, Path(source), config["vocab_size"])
        return
    _convert_tokenizer(writer, folder, config["vocab_size"], log)


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    from gguf import GGUFReader, GGUFValueType

    if not source.is_file():
        raise QuipkitError(f"--tokenizer-from {source}: no such file")
    reader = GGUFReader(str(source))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        count = "no" if tokens is None else len(tokens.data)
        raise QuipkitError(f"{source} has {count} tokens, the model {vocab_size}; give the GGUF the model came from")
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub)


def _convert_tokenizer(writer, folder: Path, vocab_size: int, log: Callable[[str], None]) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's 'gpt2' tokenizer model."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise QuipkitError(f"{folder} has no tokenizer.json; pass --tokenizer-from FILE.gguf (the GGUF the model came from)")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise QuipkitError(f"{path} is a {model.get('type')} tokenizer; GGUF export converts byte-level BPE only "
                           "(pass --tokenizer-from FILE.gguf)")
    vocab = dict(model["vocab"])
    added = {entry["id"]: entry for entry in spec.get("added_tokens", [])}
    for entry in added.values():
        vocab[entry["content"]] = entry["id"]
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(5)  # unused
            continue
        tokens.append(by_id[index])
        entry = added.get(index)
        types.append(1 if entry is None else 3 if entry.get("special") else 4)  # normal, control, user-defined
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config_path = folder / "tokenizer_config.json"
    special = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
        token = special.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in vocab:
            add(vocab[token])
    if special.get("chat_template"):
        writer.add_chat_template(special["chat_template"])
    log("GGUF export: the tokenizer's pre-tokenizer is written as 'default' (llama.cpp picks its regexes by name); "
        "pass --tokenizer-from FILE.gguf to copy a GGUF's tokenizer exactly")
