"""Randomly initialised Llama-shaped models written to disk shard by shard, for memory and scale tests.

`write_random_llama` writes config.json, the tokenizer and one bf16 safetensors shard per decoder
block (plus one for the embeddings, final norm and head) with an index, generating each shard's
tensors just before writing it: a 7B-shaped model is written holding one block in memory. Weights
are N(0, std^2) from a generator seeded by the seed and the tensor's name, so the same call writes
the same bytes; norms are ones. No hub access is needed.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    # name: (hidden, layers, intermediate, heads, kv heads)
    "tiny": (64, 2, 128, 4, 2),
    "tinyllama-1.1b": (2048, 22, 5632, 32, 4),
    "llama-2-7b": (4096, 32, 11008, 32, 32),
}


def _random(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)


def _block_shapes(prefix: str, hidden: int, intermediate: int, heads: int, kv_heads: int) -> dict[str, tuple[int, ...]]:
    head_dim = hidden // heads
    return {
        f"{prefix}.input_layernorm.weight": (hidden,),
        f"{prefix}.post_attention_layernorm.weight": (hidden,),
        f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, hidden),
        f"{prefix}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
        f"{prefix}.mlp.gate_proj.weight": (intermediate, hidden),
        f"{prefix}.mlp.up_proj.weight": (intermediate, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, intermediate),
    }


def write_random_llama(folder: str | Path, tokenizer, shape: str | tuple[int, int, int, int, int] = "tiny",
                       seed: int = 0, std: float = 0.02, context: int = 2048) -> Path:
    """Write a random Llama model of `shape` (a name in SHAPES or (hidden, layers, intermediate, heads,
    kv heads)) with `tokenizer`'s vocabulary into `folder`; returns the folder."""
    from transformers import LlamaConfig

    hidden, layers, intermediate, heads, kv_heads = SHAPES[shape] if isinstance(shape, str) else shape
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=context, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    shards = [_block_shapes(f"model.layers.{i}", hidden, intermediate, heads, kv_heads) for i in range(layers)]
    shards.append({"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
                   "lm_head.weight": (vocab, hidden)})
    weight_map: dict[str, str] = {}
    total = 0
    for number, shapes in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: torch.ones(s, dtype=torch.bfloat16) if name.endswith("norm.weight")
                   else _random(name, s, seed, std) for name, s in shapes.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1, sort_keys=True))
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
