"""The quantized checkpoint: `model.safetensors` + `config.json` (with `quantization_config`) + tokenizer.

Tensors are stored under the module paths of the loaded model, each QuantizedLinear's buffers in
their canonical dtypes (packed codes, fp16 scales and sign vectors), so the file size reflects the
bits. `quantization_config` records `quant_method: "quipkit"`, the format version, the config that
made the model and every quantized layer's constructor arguments. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from quipkit.errors import QuipkitError
from quipkit.faults import reach
from quipkit.formats.atomic import link_or_copy
from quipkit.formats.streamed_file import TensorSource, sources_in, write_safetensors
from quipkit.layers.quantized_embedding import QuantizedEmbedding
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.experts import ExpertLinears, find_fused_experts, unfuse_experts
from quipkit.models.structure import set_module

# 2: trellis codes packed last-to-first within a tile (kernel-friendly); format 1 is upgraded on load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
QUANT_METHOD = "quipkit"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE_FILE_BYTES = 2 << 30  # a checkpoint up to this size is one file; a larger one, a shard per block
REPORT = "quipkit_report.json"


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_embeddings(model: nn.Module) -> dict[str, QuantizedEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedEmbedding)}


def storage_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """{tensor name: the dtype it is stored in} for every tensor of the quantized layers and embeddings
    (a tied embedding stores nothing of its own)."""
    canonical: dict[str, torch.dtype] = {}
    for name, layer in quantized_layers(model).items():
        layout = {**layer.codebook.storage(layer.out_features, layer.in_features),
                  **layer.transform.storage(layer.out_features, layer.in_features),
                  **(layer.low_rank.storage(layer.out_features, layer.in_features) if layer.low_rank else {})}
        canonical.update({f"{name}.{key}": dtype for key, (_, dtype) in layout.items()})
    for name, embedding in quantized_embeddings(model).items():
        if not embedding.tied:
            layout = embedding.codebook.storage(embedding.num_embeddings, embedding.embedding_dim)
            canonical.update({f"{name}.{key}": dtype for key, (_, dtype) in layout.items()})
    return canonical


def state_tensors(module: nn.Module, prefix: str = "", skip: str | None = None) -> dict[str, torch.Tensor]:
    """Persistent tensors of `module` by full name (`prefix` + their name), those under `skip` left out,
    tied duplicates dropped, quantized buffers in their storage dtypes."""
    canonical = storage_dtypes(module)
    head = f"{prefix}." if prefix else ""
    seen: set[tuple[int, int, tuple]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if skip is not None and name.startswith(skip + "."):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # tied to an earlier tensor (e.g. lm_head and embeddings); loading re-ties it
        seen.add(key)
        out[head + name] = tensor.detach().to("cpu", canonical.get(name, tensor.dtype)).contiguous()
    return out


def _float_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's float parameters outside quantized layers (norms, float matrices)."""
    quantized = {id(p) for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))
                 for p in m.parameters()}
    dtypes = [p.dtype for p in model.parameters() if p.is_floating_point() and id(p) not in quantized]
    return max(set(dtypes), key=dtypes.count) if dtypes else torch.float32


def quantization_config(model: nn.Module, config: Any = None, calibration: Any = None,
                        layers: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for a quantized `model`; `layers` adds specs of
    quantized layers the model no longer holds (blocks of a streamed run, written and released)."""
    from quipkit import __version__

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "quipkit_version": __version__,
        "dtype": str(_float_dtype(model)).removeprefix("torch."),
        "config": config.to_dict() if config is not None else None,
        "calibration": calibration.to_dict() if calibration is not None else None,
        "layers": {**(layers or {}), **{name: layer.spec() for name, layer in quantized_layers(model).items()}},
        "embeddings": {name: embedding.spec() for name, embedding in quantized_embeddings(model).items()},
        "head": head_name(model),
        "experts": [name for name, module in model.named_modules() if isinstance(module, ExpertLinears)],
    }


def head_name(model: nn.Module) -> str | None:
    """The name of the output head when quipkit holds it (bf16 or quantized), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, QuantizedLinear):
        return None
    return next(name for name, module in model.named_modules() if module is head)


def decoder_layers(quant: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The quantized linears of the decoder blocks: every layer of `quantization_config` but the head."""
    return {name: spec for name, spec in quant["layers"].items() if name != quant.get("head")}


def save(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    config: Any = None,
    calibration: Any = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the quantized `model` held in memory as a checkpoint in `out_dir` (see `_publish`)."""
    if not quantized_layers(model):
        raise QuipkitError("the model has no quantized layers to save")

    def write(tmp: Path) -> None:
        # one metadata key: safetensors writes a map's keys in random order, and the bytes must not vary
        save_file(state_tensors(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        reach("save-weights")
        _write_config(tmp, model, tokenizer, quantization_config(model, config, calibration), report)

    return _publish(Path(out_dir), overwrite, write)


def save_from_blocks(
    model: nn.Module,
    tokenizer,
    out_dir: str | os.PathLike,
    block_files: list[Path],
    blocks_prefix: str,
    specs: dict[str, dict[str, Any]],
    config: Any = None,
    calibration: Any = None,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint from the blocks' finished files (a run's work folder: each holds one block's
    tensors under their final names) and what `model` holds outside the blocks (embeddings, final norm,
    head); `specs` are the quantized layers of the blocks. Nothing is read into memory but the part
    outside the blocks and one tensor at a time. A small model (all files under SINGLE_FILE_BYTES) gets
    one `model.safetensors`, the bytes `save` writes; a larger one gets one shard per block and an index."""
    rest = state_tensors(model, skip=blocks_prefix)
    size = sum(p.stat().st_size for p in block_files) + sum(t.numel() * t.element_size() for t in rest.values())

    def write(tmp: Path) -> None:
        if size <= SINGLE_FILE_BYTES:  # written a tensor at a time: never the whole result in memory
            tensors = {key: TensorSource.held(value) for key, value in rest.items()}
            for path in block_files:
                tensors.update(sources_in(path))
            write_safetensors(tmp / WEIGHTS, tensors, {"format": "pt"})
        else:
            names = [f"model-{i:05d}-of-{len(block_files) + 1:05d}.safetensors" for i in range(1, len(block_files) + 2)]
            weight_map: dict[str, str] = {}
            for path, name in zip(block_files, names):
                link_or_copy(path, tmp / name)
                with safe_open(str(path), "pt") as handle:
                    weight_map.update({key: name for key in handle.keys()})
            save_file(rest, str(tmp / names[-1]), metadata={"format": "pt"})
            weight_map.update({key: names[-1] for key in rest})
            index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX).write_text(json.dumps(index, indent=1))
        reach("save-weights")
        _write_config(tmp, model, tokenizer, quantization_config(model, config, calibration, specs), report)

    return _publish(Path(out_dir), overwrite, write)


def _write_config(folder: Path, model: nn.Module, tokenizer, quant: dict[str, Any], report: dict[str, Any] | None) -> None:
    """config.json (with `quant`), the generation config, the tokenizer and the run's report."""
    cfg = model.config.to_dict()
    cfg["quantization_config"] = quant
    # transformers' dtype="auto" otherwise takes the first float tensor's (the bf16 head, say) for the float part
    cfg["dtype"] = quant["dtype"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:
        (folder / REPORT).write_text(json.dumps(report, indent=1))
    reach("save-files")


def _publish(out: Path, overwrite: bool, write) -> Path:
    """Call `write(tmp)` to fill a temporary folder beside `out`, then rename it to `out`.

    Replacing an existing folder moves it aside first and deletes it only after the new one is in
    place, so a crash at any point leaves one complete checkpoint under `out` or beside it, which
    the next save (or `recover_save`) puts back."""
    recover_save(out)
    if out.exists() and not overwrite:
        raise QuipkitError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        write(tmp)
        if out.exists():
            os.replace(out, old)
            reach("save-moved-aside")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:  # a full disk, say: the previous result (if any) stays in place
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        kept = f"; {out} is unchanged" if out.exists() else ""
        raise QuipkitError(f"could not write the checkpoint to {out}: {err.strerror or err}{kept}; free space and "
                           "run the same command again (finished blocks are kept)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_save(out: Path) -> None:
    """Clean up after a save that was killed: put a folder moved aside back if `out` is missing, and
    remove the temporary folders of processes that are gone."""
    if not out.parent.is_dir():
        return
    for path in sorted(out.parent.glob(f".{out.name}.*-*")):
        kind, _, pid = path.name[len(out.name) + 2:].partition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if kind == "old" and not out.exists():
            os.replace(path, out)  # the previous checkpoint: the new one never arrived
        else:
            shutil.rmtree(path, ignore_errors=True)


def read_quantization_config(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, its quantization_config), with clear errors for anything that is not ours."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise QuipkitError(f"{folder} is not a model folder: it has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise QuipkitError(f"{path} is corrupt ({err.msg}); re-quantize or restore the file") from None
    quant = cfg.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        method = quant.get("quant_method") if isinstance(quant, dict) else None
        raise QuipkitError(
            f"{folder} is not a quipkit checkpoint (quantization method: {method or 'none'}); "
            "quantize it with `quipkit quantize` first"
        )
    version = quant.get("format_version")
    if version not in READABLE_VERSIONS:
        raise QuipkitError(
            f"{folder} uses checkpoint format {version}; this quipkit reads formats "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade quipkit or re-quantize)"
        )
    if not isinstance(quant.get("layers"), dict) or not quant["layers"]:
        raise QuipkitError(f"{path} lists no quantized layers; the checkpoint is corrupt")
    return cfg, quant


def _built(model: nn.Module, name: str, spec: dict[str, Any], kinds: tuple[type, ...], cls: type) -> nn.Module:
    """`cls(**spec)` to stand where the model has `name`, which must be one of `kinds`; clear errors otherwise."""
    try:
        current = model.get_submodule(name)
    except AttributeError:
        raise QuipkitError(f"the checkpoint holds '{name}', which this model does not have") from None
    if not isinstance(current, kinds):
        raise QuipkitError(f"the checkpoint's '{name}' is a {type(current).__name__} in this model, not a "
                           f"{kinds[0].__name__}")
    try:
        return cls(**spec)
    except TypeError as err:
        raise QuipkitError(f"'{name}' in the checkpoint has a bad spec: {err}") from None


def replace_linears(model: nn.Module, layers: dict[str, dict[str, Any]], experts: list[str] | None = None) -> None:
    """Swap the named nn.Linear modules for empty QuantizedLinear ones built from their specs, after
    unfusing the named experts modules into one linear per expert matrix (as quantization did)."""
    if experts:
        missing = [name for name in experts if name not in find_fused_experts(model)]
        if missing:
            raise QuipkitError(f"the checkpoint's experts module '{missing[0]}' is not a fused experts module of "
                               "this model; the checkpoint and its config.json do not match")
        unfuse_experts(model, experts)
    for name, spec in layers.items():
        set_module(model, name, _built(model, name, spec, (nn.Linear, QuantizedLinear), QuantizedLinear))


def replace_embeddings(model: nn.Module, embeddings: dict[str, dict[str, Any]]) -> None:
    """Swap the named nn.Embedding modules for empty QuantizedEmbedding ones; tied ones read the output head."""
    for name, spec in embeddings.items():
        embedding = _built(model, name, spec, (nn.Embedding, QuantizedEmbedding), QuantizedEmbedding)
        if embedding.tied:
            head = model.get_output_embeddings()
            if not isinstance(head, QuantizedLinear):
                raise QuipkitError(f"embeddings '{name}' are tied to an output head the checkpoint does not quantize")
            embedding.tie_to(head)
        set_module(model, name, embedding)


@torch.no_grad()
def upgrade_layers(model: nn.Module, version: int) -> None:
    """Bring the quantized layers of a model loaded from checkpoint format `version` to the current layout."""
    if version == FORMAT_VERSION:
        return
    for layer in quantized_layers(model).values():
        stored = layer.codebook.upgrade(layer.codebook_tensors(), version)
        for name, value in stored.items():
            setattr(layer, name, value)


def load(folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """(model, tokenizer or None when the folder has none) from a quipkit checkpoint; logits equal those
    of the model that was saved."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quipkit.formats.validate import validate_checkpoint, weights_files

    folder = Path(folder)
    cfg, quant = validate_checkpoint(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, quant.get("dtype", "float32")))
    replace_linears(model, quant["layers"], quant.get("experts"))
    replace_embeddings(model, quant.get("embeddings", {}))
    known = set(model.state_dict())
    unexpected: set[str] = set()
    for weights in weights_files(folder):  # shard by shard: at most one shard's tensors beyond the model
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as err:
            raise QuipkitError(f"{weights} is corrupt or truncated ({err}); re-quantize or restore the file") from None
        unexpected |= set(state) - known
        model.load_state_dict(state, strict=False, assign=True)
        del state
    model.tie_weights()
    upgrade_layers(model, quant["format_version"])
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if unexpected or still_meta:
        problem = sorted(unexpected)[:3] if unexpected else still_meta[:3]
        raise QuipkitError(
            f"the weights in {folder} do not match its config.json ({'unexpected' if unexpected else 'missing'} "
            f"tensors {', '.join(problem)}{'...' if len(problem) == 3 else ''}); the checkpoint is corrupt"
        )
    model.eval()
    tokenizer = None  # a checkpoint saved without one (quipkit.save(model, None, ...))
    if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as err:
            raise QuipkitError(f"the tokenizer in {folder} does not load ({str(err).splitlines()[0]}); copy the "
                               "original model's tokenizer files there") from None
    return model.to(device), tokenizer

