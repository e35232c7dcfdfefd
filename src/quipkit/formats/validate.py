"""Validate a quantized checkpoint before anything computes with it.

A checkpoint that loads with a missing, misshapen or mistyped tensor either crashes deep inside torch
or, worse, runs with randomly initialised weights. So every entry point (quipkit.load,
from_pretrained, eval, generate, info) first checks, without reading any weight: the config parses
and names a known format, codebooks and transforms; the safetensors header is whole and the file
as long as it says; and the tensors are exactly those the model needs, with the shapes and dtypes
its layers' specs and its architecture require, no more and no fewer. Each problem is one line
naming the file, the tensor and the fix.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from quipkit.errors import QuipkitError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_FIX = "re-quantize, or restore the file from where it came"


def safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares {name: {dtype, shape, data_offsets}}, checked against
    the file's length (a truncated or padded file is named as such)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise QuipkitError(f"{path} is truncated ({size} bytes, no header); {_FIX}")
        length = struct.unpack("<Q", head)[0]
        if length > size - 8 or length > 1 << 30:
            raise QuipkitError(f"{path} is truncated or not a safetensors file (header of {length} bytes in a "
                               f"{size}-byte file); {_FIX}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QuipkitError(f"{path} has a corrupt header; {_FIX}") from None
    if not isinstance(header, dict):
        raise QuipkitError(f"{path} has a corrupt header; {_FIX}")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            start, stop = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            count = 1
            for dim in shape:
                count *= int(dim)
        except (KeyError, TypeError, ValueError):
            raise QuipkitError(f"{path}: tensor '{name}' has a corrupt header entry; {_FIX}") from None
        if dtype not in _DTYPES or stop - start != count * _DTYPES[dtype].itemsize:
            raise QuipkitError(f"{path}: tensor '{name}' has a corrupt header entry ({dtype} {shape}); {_FIX}")
        end = max(end, stop)
    if 8 + length + end != size:
        kind = "truncated" if 8 + length + end > size else "longer than its header says"
        raise QuipkitError(f"{path} is {kind} ({size} bytes, the header needs {8 + length + end}); {_FIX}")
    return header


def skeleton(folder: Path, quant: dict[str, Any]):
    """The checkpoint's model built on the meta device from config.json, with quipkit's layers in place:
    every shape, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from quipkit.formats.checkpoint import replace_embeddings, replace_linears

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # transformers and huggingface_hub raise many types for a bad config
        raise QuipkitError(f"{folder / 'config.json'} does not describe a model transformers knows "
                           f"({str(err).splitlines()[0]}); {_FIX}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=True):  # shapes only: nothing is allocated
        try:
            model = AutoModelForCausalLM.from_config(config)
        except Exception as err:  # transformers raises many types for a config it cannot build
            raise QuipkitError(f"{folder / 'config.json'} does not build a model ({type(err).__name__}: "
                               f"{str(err).splitlines()[0] if str(err) else ''}); {_FIX}") from None
        replace_linears(model, quant["layers"], quant.get("experts"))
        replace_embeddings(model, quant.get("embeddings") or {})
    return model


def expected_tensors(model) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """{name: (shape, dtype or None for any float type)} of every tensor the checkpoint of `model` (its
    skeleton) must hold, tied tensors once. Quantized layers' tensors need their exact storage dtype;
    float weights may be stored in any float type; other tensors need their own dtype."""
    from quipkit.formats.checkpoint import storage_dtypes

    quantized = storage_dtypes(model)
    persistent = set(model.state_dict())
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    seen: set[int] = set()
    for name, tensor in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers()):
        if name not in persistent or id(tensor) in seen:
            continue  # non-persistent buffers are not stored; tied tensors are stored once
        seen.add(id(tensor))
        dtype = quantized.get(name, None if tensor.is_floating_point() else tensor.dtype)
        out[name] = (tuple(tensor.shape), dtype)
    return out


def validate_checkpoint(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, quantization_config) of a checkpoint that passed every check, else one QuipkitError."""
    cfg, quant, _, _ = inspect_checkpoint(folder)
    return cfg, quant


def inspect_checkpoint(folder: str | Path):
    """(config.json, quantization_config, the model's skeleton, the weights file's header) of a checkpoint
    that passed every check, for callers that go on to read its shapes and sizes (`formats/account.py`)."""
    from quipkit.formats.checkpoint import read_quantization_config

    folder = Path(folder)
    cfg, quant = read_quantization_config(folder)
    _check_specs(folder, quant)
    files = weights_files(folder)
    header: dict[str, dict[str, Any]] = {}
    where: dict[str, Path] = {}
    for path in files:
        for name, entry in safetensors_header(path).items():
            header[name], where[name] = entry, path
    model = skeleton(folder, quant)
    expected = expected_tensors(model)
    optional = _tied_output(model)
    for name, (shape, dtype) in expected.items():
        if name not in header and name in optional:
            continue
        if name not in header:
            raise QuipkitError(f"{_named(files)} lacks tensor '{name}' that the model needs; {_FIX}")
        weights = where[name]
        entry = header[name]
        if tuple(entry["shape"]) != shape:
            raise QuipkitError(f"{weights}: tensor '{name}' has shape {tuple(entry['shape'])}, the model needs "
                               f"{shape}; {_FIX}")
        stored = _DTYPES[entry["dtype"]]
        if (dtype is not None and stored != dtype) or (dtype is None and not stored.is_floating_point):
            raise QuipkitError(f"{weights}: tensor '{name}' is {stored}, the model needs "
                               f"{dtype if dtype is not None else 'a float type'}; {_FIX}")
    unexpected = sorted(set(header) - set(expected))
    if unexpected:
        raise QuipkitError(f"{where[unexpected[0]]} holds tensor '{unexpected[0]}' that the model does not have"
                           f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; {_FIX}")
    return cfg, quant, model, header


def shard_map(folder: Path) -> dict[str, str] | None:
    """{tensor name: file name} from the folder's safetensors index, or None when it has no index."""
    from quipkit.formats.checkpoint import INDEX

    index = folder / INDEX
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise QuipkitError(f"{index} is corrupt (no weight_map); {_FIX}") from None
    return weight_map


def weights_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: `model.safetensors`, or the shards its index names (each present)."""
    from quipkit.formats.checkpoint import WEIGHTS

    weight_map = shard_map(folder)
    if weight_map is None:
        if not (folder / WEIGHTS).is_file():
            raise QuipkitError(f"{folder} has no {WEIGHTS}; the checkpoint is incomplete ({_FIX})")
        return [folder / WEIGHTS]
    names = sorted(set(weight_map.values()))
    for name in names:
        if not (folder / name).is_file():
            raise QuipkitError(f"{folder} lacks {name}, a shard its index names; the checkpoint is incomplete ({_FIX})")
    return [folder / name for name in names]


def _named(files: list[Path]) -> str:
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} (its {len(files)} shards)"


def _tied_output(model) -> set[str]:
    """The output head's weight name when the config ties it to the input embeddings: the file holds it
    once, under the embeddings' name (a skeleton built inside from_pretrained is not tied yet)."""
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head = model.get_output_embeddings()
    if not getattr(text_config, "tie_word_embeddings", False) or head is None or hasattr(head, "codebook"):
        return set()
    return {f"{name}.weight" for name, module in model.named_modules() if module is head}


def _check_specs(folder: Path, quant: dict[str, Any]) -> None:
    """Every layer and embedding spec names known codebooks and transforms with valid parameters."""
    from quipkit.codebooks import make_codebook
    from quipkit.codebooks.low_rank import LowRank
    from quipkit.transforms import make_transform

    path = folder / "config.json"
    for name, spec in quant["layers"].items():
        if not isinstance(spec, dict) or not all(isinstance(spec.get(k), int) and spec[k] > 0
                                                  for k in ("in_features", "out_features")):
            raise QuipkitError(f"{path}: layer '{name}' has a bad spec {spec!r}; {_FIX}")
        for part, build in (("codebook", make_codebook), ("transform", make_transform)):
            if not isinstance(spec.get(part), dict):
                raise QuipkitError(f"{path}: layer '{name}' has no {part}; {_FIX}")
            try:
                built = build(spec[part])
            except QuipkitError as err:
                raise QuipkitError(f"{path}: layer '{name}': {err}") from None
            if part == "codebook":
                try:
                    built.check_shape(spec["out_features"], spec["in_features"])
                except QuipkitError as err:
                    raise QuipkitError(f"{path}: layer '{name}': {err}") from None
        if "low_rank" in spec:
            try:
                LowRank(**spec["low_rank"]).check_shape(spec["out_features"], spec["in_features"])
            except (QuipkitError, TypeError) as err:
                raise QuipkitError(f"{path}: layer '{name}' has a bad low-rank term ({err}); {_FIX}") from None
    experts = quant.get("experts") or []
    if not isinstance(experts, list) or not all(isinstance(name, str) for name in experts):
        raise QuipkitError(f"{path}: 'experts' is not a list of module names; {_FIX}")
    embeddings = quant.get("embeddings") or {}
    if not isinstance(embeddings, dict):
        raise QuipkitError(f"{path}: 'embeddings' is not a mapping; {_FIX}")
    for name, spec in embeddings.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("codebook"), dict):
            raise QuipkitError(f"{path}: embeddings '{name}' have a bad spec {spec!r}; {_FIX}")
        try:
            make_codebook(spec["codebook"])
        except QuipkitError as err:
            raise QuipkitError(f"{path}: embeddings '{name}': {err}") from None
