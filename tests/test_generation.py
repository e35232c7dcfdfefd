"""The lean decoding loop: the same greedy tokens as transformers' generate, static or dynamic cache,
float or quantized, and the numbers `quipkit generate --stats` reports."""

from __future__ import annotations

import json

import pytest
import torch

from quipkit import generation
from quipkit.generation import generate, model_bytes

from conftest import tiny_model
from test_pipeline import _quantized, _tokens


def _transformers_tokens(model, ids, n):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("quantized", [False, True])
def test_greedy_tokens_match_transformers_generate(quantized):
    model = _quantized(method="quip#", bits=2)[0] if quantized else tiny_model()
    ids = _tokens(seed=8)[:1, :12]
    tokens, stats = generate(model, ids, 10)
    assert tokens == _transformers_tokens(model, ids, 10)
    assert stats.prompt_tokens == 12 and stats.new_tokens == 10
    assert stats.decode_tokens_per_second > 0 and stats.prefill_tokens_per_second > 0
    assert stats.model_bytes == model_bytes(model) > 0


def test_dynamic_cache_when_no_static_one_fits(monkeypatch):
    model = tiny_model(family="qwen2")
    ids = _tokens(seed=9)[:1, :7]
    expected, _ = generate(model, ids, 6)
    monkeypatch.setattr(generation, "_static_cache", lambda model, length: None)
    monkeypatch.setattr(generation.LeanDecoder, "build", classmethod(lambda cls, model, length: None))
    assert generate(model, ids, 6)[0] == expected == _transformers_tokens(model, ids, 6)


def test_stops_at_end_of_sequence_tokens():
    model = tiny_model()
    ids = _tokens(seed=10)[:1, :5]
    full, _ = generate(model, ids, 8)
    stop = full[3]
    tokens, stats = generate(model, ids, 8, eos_token_ids=(stop,))
    assert tokens == full[: full.index(stop) + 1] and stats.new_tokens == len(tokens)


def test_model_bytes_counts_tied_tensors_once():
    model = tiny_model(tie_word_embeddings=True)
    expected = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() skips the tied copy
    assert model_bytes(model) == expected + sum(b.numel() * b.element_size() for b in model.buffers())


def test_cli_generate_stats_and_info_kernels(capsys, tmp_path, smol_tokenizer):
    from quipkit import cli

    folder = tmp_path / "tiny"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    code = cli.main(["generate", str(folder), "Hello", "--max-new-tokens", "3", "--no-chat", "--stats", "--json",
                     "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    stats = json.loads(out[out.index("{"):])
    assert stats["new_tokens"] <= 3 and stats["threads"] == 1 and stats["kernels"].startswith("no quantized layers")
    assert stats["forward"] == "lean"
    assert cli.main(["info", "--kernels", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    listed = {row["codebook"] for row in info["kernels"]}
    assert listed >= {"e8p 2-bit", "trellis-1mad 2-bit", "scalar 4-bit", "icquant 2-bit"}
    assert info["compiled_extension"] == (info["tier"] is not None)
