"""A forward for decoders laid out like Llama (Llama, Mistral, Qwen2, Qwen3) with few torch ops and a
preallocated KV cache: what the lean generation loop runs wherever `LeanDecoder.build` accepts the model.

transformers' forward spends most of a small quantized model's decode step outside the weights: per
layer and token it builds masks, rotary tables and cache views through a stack of decorators, about
0.8-1 ms of Python and tiny ops on a CPU, more than the layer's 2-bit kernels. This forward calls the
model's own modules for every weight (quantized or not, so every kernel and the eager reference
still apply) and does the rest in few calls: in float32 on a CPU with the compiled extension, one
call per norm and one for the new position's attention (rotary embedding, cache write, softmax;
_native/decoder_step.c); elsewhere, and for the prefill, torch ops: the RMS norm fused, the rotary
embedding as a batched multiply by rotation matrices built once per step for all layers, the
attention of one position as two small matmuls over the cache. The torch path is the extension's
reference; tests hold both to transformers' forward on every architecture this accepts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quipkit import native

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")


def _rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """The module's RMS norm of x [..., d] in one op where the dtypes allow, else the module itself."""
    if x.dtype is torch.float32 and norm.weight.dtype is torch.float32:
        return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)
    return norm(x)


def _native_rms_norm(x: Tensor, norm: nn.Module) -> Tensor:
    """The same for x [..., d] float32, contiguous, on the CPU with a float32 weight, in one C call."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    native.module().rms_norm(x.data_ptr(), x.numel() // n, n, norm.weight.data_ptr(), norm.variance_epsilon,
                             out.data_ptr())
    return out


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def _one_row_call(module: nn.Module):
    """module's forward for one float32 row: a quantized layer's bound call where it has one."""
    bound = getattr(module, "bound_one_row_call", None)
    call = bound() if bound is not None else None
    return call if call is not None else module


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
    kv_heads, length, head_dim] for up to `length` positions, and the quantized layers' calls with
    their tensors bound: build one per generation, and a new one after changing the model."""

    def __init__(self, model: nn.Module, length: int) -> None:
        body, config = model.model, model.config
        attention = body.layers[0].self_attn
        self.model, self.body, self.length = model, body, length
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.scaling = attention.head_dim, attention.scaling
        self.qk_norms = hasattr(attention, "q_norm")
        embedding = body.embed_tokens(torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device))
        shape = (len(body.layers), self.kv_heads, length, self.head_dim)
        self.keys = torch.zeros(shape, dtype=embedding.dtype, device=embedding.device)
        self.values = torch.zeros_like(self.keys)
        self.filled = 0
        norms = [body.norm] + [n for layer in body.layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
        norms += [n for layer in body.layers for n in (getattr(layer.self_attn, "q_norm", None),
                                                       getattr(layer.self_attn, "k_norm", None)) if n is not None]
        self.native = (native.available() and self.keys.device.type == "cpu" and self.keys.dtype is torch.float32
                       and all(n.weight.dtype is torch.float32 and n.weight.is_contiguous() for n in norms))
        # per layer: q, k, v, o, gate, up, down; and as called for one position (quantized layers' bound calls)
        self.projections = [tuple(layer.get_submodule(n) for n in _LAYER_MODULES[:7]) for layer in body.layers]
        self.one_row = [tuple(_one_row_call(m) for m in modules) for modules in self.projections]
        self.head_one_row = _one_row_call(model.lm_head)

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
        in_c = self.native and count == 1
        norm = _native_rms_norm if in_c else _rms_norm
        attend, calls = (self._attend_in_c, self.one_row) if in_c else (self._attend, self.projections)
        head = self.head_one_row if in_c else self.model.lm_head
        if in_c:
            rope = (cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous())
        else:
            rotation = _rotations(cos[0], sin[0])  # [T, D, D]
            rope = (rotation * self.scaling, rotation)  # the attention's scale folded into the queries'
        for index, layer in enumerate(self.body.layers):
            attention = layer.self_attn
            q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj = calls[index]
            h = norm(x, layer.input_layernorm)
            q = q_proj(h).view(count, self.heads, self.head_dim)
            k = k_proj(h).view(count, self.kv_heads, self.head_dim)
            v = v_proj(h).view(count, self.kv_heads, self.head_dim)
            if self.qk_norms:
                q, k = norm(q, attention.q_norm), norm(k, attention.k_norm)
            x = x + o_proj(attend(index, q, k, v, rope, start))
            h = norm(x, layer.post_attention_layernorm)
            x = x + down_proj(F.silu(gate_proj(h)).mul_(up_proj(h)))
        self.filled = end
        return head(norm(x[-1:].contiguous(), self.body.norm))

    def _attend(self, index: int, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor], start: int) -> Tensor:
        """Queries q [T, heads, D], new keys and values [T, kv_heads, D] at positions start.. ->
        [T, heads * D]; rope: the rotations [T, D, D] for queries (scaled) and keys."""
        count, group = q.shape[0], self.heads // self.kv_heads
        q, k = torch.bmm(q, rope[0]), torch.bmm(k, rope[1])
        keys, values = self.keys[index], self.values[index]
        keys[:, start:start + count] = k.transpose(0, 1)
        values[:, start:start + count] = v.transpose(0, 1)
        keys, values = keys[:, :start + count], values[:, :start + count]
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

    def _attend_in_c(self, index: int, q: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor],
                     start: int) -> Tensor:
        """The same for one position in one call of the extension; rope: cos and sin [D]."""
        out = torch.empty(1, self.heads * self.head_dim)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        native.module().attention_step(q.data_ptr(), k.data_ptr(), v.data_ptr(), rope[0].data_ptr(), rope[1].data_ptr(),
                                       self.scaling, self.keys[index].data_ptr(), self.values[index].data_ptr(), start,
                                       self.length, self.heads, self.kv_heads, self.head_dim, out.data_ptr())
        return out
