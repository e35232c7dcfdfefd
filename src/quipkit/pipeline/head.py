"""The parts of a model outside its decoder blocks: the output head and the token embeddings.

By default (`head_bits=8`) the head is quantized on a per-group integer grid (`head_group(bits)`
columns per group; 6 and 4 bits also), rounded by LDLQ against the Hessian of its input (the final
hidden states after the last norm), as llama.cpp and ExLlamaV3 do; a float head is most of a small
model's "2-bit" checkpoint and a quarter of its decode time. `16` holds and stores the head and the
embeddings in bf16 (what llama.cpp export needs), `32` keeps float32.
A tied embedding reads the head's stored tensors, so that matrix is held once. Embeddings that do
more than look rows up (Gemma scales them) keep their float matrix, and so does a head tied to one.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from quipkit.config import QuantConfig
from quipkit.layers.quantized_embedding import QuantizedEmbedding
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.pipeline.capture import capture_head_inputs
from quipkit.pipeline.hessian_cache import HessianCache
from quipkit.pipeline.layer_group import LayerRecord, quantize_group
from quipkit.rounding import HessianAccumulator

BF16 = {"name": "dense", "bits": 16}
IDENTITY = {"name": "identity"}


def head_group(bits: int) -> int:
    """Columns per scale of a quantized head: 32 at 6 and 4 bits, where the grid is coarse; 128 at 8 bits, whose
    grid is fine enough without, and whose matvec then runs 1.5x faster (a group's scale and zero point cost
    as much as decoding its 32 weights)."""
    return 128 if bits == 8 else 32


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _tied(head: nn.Module | None, embedding: nn.Module | None) -> bool:
    if not isinstance(head, nn.Linear) or not isinstance(embedding, nn.Embedding):
        return False
    return head.weight is embedding.weight or (not head.weight.is_meta
                                               and head.weight.data_ptr() == embedding.weight.data_ptr())


def _plain(embedding: nn.Module | None) -> bool:
    """An embedding that only looks rows up (a subclass may scale them, as Gemma's does: kept as it is)."""
    return isinstance(embedding, nn.Embedding) and type(embedding).forward is nn.Embedding.forward


def stored_embedding_dtype(model: nn.Module, head_bits: int) -> torch.dtype | None:
    """The dtype `compress_head` will store the embedding rows in (bf16), or None when they stay float or
    become the quantized head's rows (tied at 8/6/4 bits)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head_bits == 32 or not _plain(embedding) or (_tied(head, embedding) and head_bits != 16):
        return None
    return torch.bfloat16


def rounds_head(model: nn.Module, config: QuantConfig) -> bool:
    """Whether `compress_head` rounds the head against the Hessian of its input."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return (config.head_bits in (8, 6, 4) and config.needs_calibration and isinstance(head, nn.Linear)
            and not (_tied(head, embedding) and not _plain(embedding)))


def compress_head(model: nn.Module, config: QuantConfig, device, batches: list[Tensor] | None = None,
                  blocks: nn.ModuleList | None = None, final_outputs: list[Tensor] | None = None,
                  returns_tuple: bool = False, load_embeddings=None,
                  cache: HessianCache | None = None) -> LayerRecord | None:
    """Replace the output head and the token embeddings as `config.head_bits` says; returns the head's record.

    `batches` (calibration tokens) are needed when the head is rounded against its Hessian; with
    `final_outputs` (the last block's outputs per batch; `returns_tuple`: what blocks return) collecting
    it runs no block. `cache` (a HessianCache) serves that Hessian when it holds it, and is given it
    otherwise, so a run from the cache rounds the head as the run that filled it did. `load_embeddings()`,
    when given, is called once the head is done and before the embeddings are needed (a streamed model
    reads them from disk then, not while the head is in memory).
    """
    bits = config.head_bits
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if bits == 32:
        return None
    tied = _tied(head, embedding)
    if tied and not _plain(embedding):
        return None  # the head shares the embedding's float matrix, which stays as it is
    record = None
    if isinstance(head, nn.Linear):
        name = _name_of(model, head)
        if bits == 16:
            spec = {"in_features": head.in_features, "out_features": head.out_features, "codebook": BF16,
                    "transform": IDENTITY, "bias": head.bias is not None}
            quantized = QuantizedLinear.from_tensors(spec, {"weight": head.weight.detach()}, head.bias)
        else:
            calibrated = rounds_head(model, config)  # the one rule the Hessian cache also asks
            head_config = QuantConfig(
                method="gptq" if calibrated else "rtn", bits=bits, transform=IDENTITY,
                codebook={"name": "scalar", "bits": bits, "group_size": head_group(bits)},
                rounding="ldlq" if calibrated else "nearest", act_order=calibrated, damping=config.damping,
                seed=config.seed, head_bits=32,
            )
            hessian = torch.eye(head.in_features, dtype=torch.float64)
            if calibrated and cache is not None and cache.has_head:
                hessian = cache.load_head()
            elif calibrated:
                accumulator = HessianAccumulator(head.in_features, device)
                capture_head_inputs(model, blocks, batches, head, accumulator.add, final_outputs, returns_tuple)
                hessian = accumulator.mean()
                if cache is not None:
                    cache.save_head(hessian)
            [(quantized, record)] = quantize_group({name: head}, hessian, head_config, device)
        model.set_output_embeddings(quantized.to(head.weight.device))
        head = quantized
    if load_embeddings is not None:
        load_embeddings()
        embedding = model.get_input_embeddings()
    if _plain(embedding):
        dtype = str(embedding.weight.dtype).removeprefix("torch.")
        if tied and isinstance(head, QuantizedLinear):
            replacement = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, head.codebook.spec(),
                                             tied=True, dtype=dtype)
            replacement.tie_to(head)
            model.config.tie_word_embeddings = False  # quipkit ties them: the embedding reads the head
        else:
            replacement = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, BF16, dtype=dtype)
            replacement.weight = embedding.weight.detach().bfloat16()
        model.set_input_embeddings(replacement.to(embedding.weight.device))
    return record
