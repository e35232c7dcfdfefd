"""The lean Llama-layout forward: the logits of transformers' forward at every position, on every
architecture it accepts, float and quantized; None (so the loop falls back) where it does not apply."""

from __future__ import annotations

import pytest
import torch

from quipkit import generation, native
from quipkit.generation import generate
from quipkit.lean_decoder import LeanDecoder, _native_rms_norm, _rms_norm, _rotations, _why_not

from conftest import tiny_model
from test_pipeline import _quantized, _tokens


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0]


needs_native = pytest.mark.skipif(not native.available(), reason="the compiled extension is not built")


def _check_against_forward(model, ids, prompt: int, atol: float, in_c: bool = True) -> None:
    """Prefill `prompt` tokens then step through the rest of `ids` [1, T]: each position's logits as
    transformers' forward of the whole sequence computes them (steps in C, or through torch ops)."""
    expected = _reference_logits(model, ids)
    decoder = LeanDecoder.build(model, ids.shape[1])
    assert decoder is not None, _why_not(model, ids.shape[1])
    assert decoder.native == native.available()  # float32 on the CPU: the C steps wherever the extension is
    decoder.native = in_c and native.available()
    got = [decoder.prefill(ids[:, :prompt])[0]]
    got += [decoder.step(ids[:, t:t + 1])[0] for t in range(prompt, ids.shape[1])]
    torch.testing.assert_close(torch.stack(got), expected[prompt - 1:], atol=atol, rtol=1e-4)


@pytest.mark.parametrize("in_c", [True, False], ids=["c-steps", "torch-steps"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_logits_match_transformers_forward(family, in_c):
    model = tiny_model(family, seed=3)
    attention = model.model.layers[0].self_attn
    if family == "qwen2":  # q/k/v biases: the modules carry them
        assert attention.q_proj.bias is not None
    assert hasattr(attention, "q_norm") == (family == "qwen3")  # per-head norms before the rotation
    _check_against_forward(model, _tokens(seed=4)[:1, :20], prompt=7, atol=2e-5, in_c=in_c)


@pytest.mark.parametrize("head_bits", [16, 8])
@pytest.mark.parametrize("in_c", [True, False], ids=["c-steps", "torch-steps"])
def test_quantized_logits_match_and_tokens_match_transformers_generate(in_c, head_bits):
    model = _quantized(method="quip#", bits=2, head_bits=head_bits)[0]
    ids = _tokens(seed=5)[:1, :18]
    _check_against_forward(model, ids, prompt=6, atol=1e-4, in_c=in_c)
    tokens, stats = generate(model, ids[:, :6], 8)
    with torch.no_grad():
        out = model.generate(ids[:, :6], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    assert stats.forward == "lean" and tokens == out[0, 6:].tolist()


def test_one_token_prompt_and_a_rope_scaled_model():
    model = tiny_model("llama", seed=6, rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                         "original_max_position_embeddings": 32})
    assert model.model.rotary_emb.rope_type == "llama3"
    _check_against_forward(model, _tokens(seed=7)[:1, :40], prompt=1, atol=2e-5)


def test_declines_what_it_cannot_run_and_the_loop_falls_back():
    gemma = tiny_model("gemma")
    assert "gemma" in _why_not(gemma, 16) and LeanDecoder.build(gemma, 16) is None
    windowed = tiny_model("mistral", sliding_window=8)
    assert "sliding window of 8" in _why_not(windowed, 20) and _why_not(windowed, 8) is None
    ids = _tokens(seed=8)[:1, :10]
    tokens, stats = generate(windowed, ids, 10)
    with torch.no_grad():
        out = windowed.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert stats.forward == "transformers" and tokens == out[0, 10:].tolist()


def test_refuses_positions_beyond_its_cache_and_a_second_prefill():
    model = tiny_model()
    decoder = LeanDecoder.build(model, 6)
    ids = _tokens(seed=9)[:1, :6]
    decoder.prefill(ids[:, :5])
    with pytest.raises(ValueError, match="empty cache"):
        decoder.prefill(ids[:, :2])
    decoder.step(ids[:, 5:6])
    with pytest.raises(ValueError, match="7 positions exceed the 6"):
        decoder.step(ids[:, :1])


def test_forced_transformers_forward_gives_the_same_tokens(monkeypatch):
    model = tiny_model("qwen2")
    ids = _tokens(seed=10)[:1, :7]
    lean, stats = generate(model, ids, 6)
    monkeypatch.setattr(generation.LeanDecoder, "build", classmethod(lambda cls, model, length: None))
    plain, plain_stats = generate(model, ids, 6)
    assert (stats.forward, plain_stats.forward) == ("lean", "transformers") and lean == plain


@needs_native
@pytest.mark.parametrize("shape", [(1, 576), (3, 64), (9, 10)])
def test_the_c_rms_norm_matches_torch(shape):
    norm = tiny_model().model.norm
    gen = torch.Generator().manual_seed(11)
    norm.weight.data = torch.randn(shape[-1], generator=gen)
    x = torch.randn(shape, generator=gen) * 3
    torch.testing.assert_close(_native_rms_norm(x, norm), _rms_norm(x, norm), rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("heads,kv_heads,dim,position", [(4, 2, 16, 0), (9, 3, 64, 37), (6, 6, 10, 5), (8, 1, 32, 100)])
def test_the_c_attention_step_matches_torch(heads, kv_heads, dim, position):
    """One position's rotary embedding, cache write and attention: the C call and the torch path on the
    same random cache, grouped queries and head widths that are not SIMD multiples included."""
    model = tiny_model(num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=heads * dim, head_dim=dim)
    results = []
    for in_c in (True, False):
        decoder = LeanDecoder(model, position + 3)
        decoder.keys.copy_(torch.randn(decoder.keys.shape, generator=torch.Generator().manual_seed(1)))
        decoder.values.copy_(torch.randn(decoder.values.shape, generator=torch.Generator().manual_seed(2)))
        q, k, v = (torch.randn(1, n, dim, generator=torch.Generator().manual_seed(3 + n)) for n in (heads, kv_heads, kv_heads))
        cos, sin = model.model.rotary_emb(q, torch.tensor([[position]]))
        if in_c:
            out = decoder._attend_in_c(0, q, k, v, (cos.reshape(-1), sin.reshape(-1)), position)
        else:
            rotation = _rotations(cos[0], sin[0])
            out = decoder._attend(0, q, k, v, (rotation * decoder.scaling, rotation), position)
        results.append((out, decoder.keys.clone(), decoder.values.clone()))
    for got, expected in zip(results[0], results[1]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
