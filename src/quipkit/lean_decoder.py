"""A forward for decoders laid out like Llama (Llama, Mistral, Qwen2, Qwen3) with few torch ops and a
preallocated KV cache: what the lean generation loop runs wherever `LeanDecoder.build` accepts the model.

transformers' forward spends most of a small quantized model's decode step outside the weights: per
layer and token it builds masks, rotary tables and cache views through a stack of decorators, about
0.8 ms of Python and tiny ops on a CPU, more than the layer's 2-bit kernels. This forward calls the
model's own modules for every weight (quantized or not, so every kernel and the eager reference
still apply) and does the rest with about fifteen ops per layer: one fused RMS norm, the rotary
embedding as one batched multiply by a rotation matrix built once per step for all layers, the
attention of one new token as two small matmuls over the cache. Tests hold its logits to
transformers' forward on every architecture it accepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """The module's RMS norm of x [..., d] in one op where the dtypes allow, else the module itself."""
    if x.dtype is torch.float32 and norm.weight.dtype is torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _rotations(cos: Tensor, sin: Tensor) -> Tensor:
    """[T, D, D]: per position the matrix R with q R = q cos + rotate_half(q) sin for rows q [D]."""
    half = cos.shape[-1] // 2
    rotation = torch.diag_embed(cos)
    rotation[:, half:, :half] -= torch.diag_embed(sin[:, :half])
    rotation[:, :half, half:] += torch.diag_embed(sin[:, half:])
    return rotation


def _why_not(model: nn.Module, length: int) -> str | None:
    """Why this forward cannot run `model` for `length` positions, or None when it can."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return f"architecture {getattr(config, 'model_type', None)!r} is not one of {ARCHITECTURES}"
    body = getattr(model, "model", None)
    if not all(hasattr(body, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")) or not hasattr(model, "lm_head"):
        return "the model lacks the Llama layout (model.embed_tokens/layers/norm/rotary_emb, lm_head)"
    if getattr(config, "hidden_act", None) != "silu":
        return f"activation {getattr(config, 'hidden_act', None)!r} is not silu"
    for layer in body.layers:
        if not all(_has(layer, n) for n in _LAYER_MODULES):
            return "a decoder layer lacks the Llama layout"
        window = getattr(layer.self_attn, "sliding_window", None)
        if config.model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        if window is not None and length > window:
            return f"{length} positions exceed the sliding window of {window}"
    attention = body.layers[0].self_attn
    device = next(model.parameters()).device
    cos, _ = body.rotary_emb(torch.zeros(1, 1, 1, device=device), torch.zeros(1, 1, dtype=torch.long, device=device))
    if cos.shape[-1] != attention.head_dim:
        return "the rotary embedding does not cover the whole head"
    return None


class LeanDecoder:
    """Greedy decoding's forward for one sequence: `prefill(ids)` from an empty cache, then `step(ids)`
    per token; both return the last position's logits [1, vocab]. Holds keys and values [layers,
    kv_heads, length, head_dim] for up to `length` positions."""

    def __init__(self, model: nn.Module, length: int) -> None:
        body, config = model.model, model.config
        attention = body.layers[0].self_attn
        self.model, self.body, self.length = model, body, length
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.qk_norms = hasattr(attention, "q_norm")
        embedding = body.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=self._device()))
        shape = (len(body.layers), self.kv_heads, length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=embedding.dtype, device=embedding.device)
        self.values = torch.zeros_like(self.keys)
        self.filled = 0

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def build(cls, model: nn.Module, length: int) -> LeanDecoder | None:
        """The decoder for `model` and up to `length` positions, or None where it does not apply."""
        return None if _why_not(model, length) is not None else cls(model, length)

    @torch.no_grad()
    def prefill(self, ids: Tensor) -> Tensor:
        """ids [1, T] at positions 0..T-1 of an empty cache -> logits [1, vocab] of the last one."""
        if self.filled:
            raise ValueError("prefill takes an empty cache: build a new LeanDecoder for a new prompt")
        return self._forward(ids)

    @torch.no_grad()
    def step(self, ids: Tensor) -> Tensor:
        """ids [1, 1] at the next position -> logits [1, vocab]."""
        return self._forward(ids)

    def _forward(self, ids: Tensor) -> Tensor:
        count = ids.shape[1]
        start, end = self.filled, self.filled + count
        if end > self.length:
            raise ValueError(f"{end} positions exceed the {self.length} this decoder holds")
        x = self.body.embed_tokens(ids)[0]  # [T, hidden]
        positions = torch.arange(start, end, device=x.device)[None]
        cos, sin = self.body.rotary_emb(x, positions)
        rotation = _rotations(cos[0], sin[0])  # [T, D, D]
        query_rotation = rotation * self.scaling  # folds the attention's scale into the queries
        for index, layer in enumerate(self.body.layers):
            attention = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q = attention.q_proj(h).view(count, self.heads, self.head_dim)
            k = attention.k_proj(h).view(count, self.kv_heads, self.head_dim)
            v = attention.v_proj(h).view(count, self.kv_heads, self.head_dim)
            if self.qk_norms:
                q, k = _rms_norm(q, attention.q_norm), _rms_norm(k, attention.k_norm)
            q, k = torch.bmm(q, query_rotation), torch.bmm(k, rotation)
            keys, values = self.keys[index], self.values[index]
            keys[:, start:end] = k.transpose(0, 1)
            values[:, start:end] = v.transpose(0, 1)
            out = self._attend(q, keys[:, :end], values[:, :end], start)
            x = x + attention.o_proj(out)
            h = _rms_norm(x, layer.post_attention_layernorm)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)).mul_(mlp.up_proj(h)))
        self.filled = end
        return self.model.lm_head(_rms_norm(x[-1:], self.body.norm))

    def _attend(self, q: Tensor, keys: Tensor, values: Tensor, start: int) -> Tensor:
        """Queries [T, heads, D] (scaled) over keys/values [kv_heads, n, D] -> [T, heads * D]."""
        count, group = q.shape[0], self.heads // self.kv_heads
        if count == 1:  # two small matmuls: cheaper than SDPA's setup for one query
            q = q.view(self.kv_heads, group, self.head_dim)
            scores = torch.bmm(q, keys.transpose(1, 2))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            return torch.bmm(probs, values).view(1, self.heads * self.head_dim)
        if start:
            raise ValueError("several new positions are taken only by the prefill")
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=True,
                                             scale=1.0, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(count, self.heads * self.head_dim)
