"""The output head and the token embeddings: bf16 by default, an integer grid with --head-bits, tied
matrices held once, and the checkpoint round trip through quipkit.load and transformers."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import quipkit
from quipkit.config import make_config
from quipkit.layers.quantized_embedding import QuantizedEmbedding
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.structure import find_blocks
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.capture import capture_head_inputs

from conftest import tiny_model
from test_pipeline import CAL, _tokens


def _tied_model():
    return tiny_model(tie_word_embeddings=True)


def test_replayed_final_states_reach_the_head_as_a_full_forward_does():
    model = _tied_model()
    batches = list(torch.split(_tokens(n=4), 2))
    _, blocks = find_blocks(model)
    seen_full, seen_replay = [], []
    capture_head_inputs(model, blocks, batches, model.lm_head, seen_full.append)
    finals = []
    handle = blocks[-1].register_forward_hook(lambda m, a, out: finals.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    handle.remove()
    capture_head_inputs(model, blocks, batches, model.lm_head, seen_replay.append, finals)
    assert len(seen_full) == len(seen_replay) == 2
    for a, b in zip(seen_full, seen_replay):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("head_bits", [16, 8, 4])
def test_head_bits_tied_round_trip(head_bits, tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    reference = _tied_model()
    model = _tied_model()
    config = make_config("quip#", 2, head_bits=head_bits)
    report = quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
    head, embedding = model.lm_head, model.get_input_embeddings()
    assert isinstance(head, QuantizedLinear) and isinstance(embedding, QuantizedEmbedding) and embedding.tied
    expected_codebook = {"name": "dense", "bits": 16} if head_bits == 16 else \
        {"name": "scalar", "bits": head_bits, "group_size": 128 if head_bits == 8 else 32, "symmetric": False, "clip": False}
    assert head.codebook.spec() == expected_codebook
    assert (report.head is None) == (head_bits == 16)
    ids = _tokens(seed=4)[:2, :6]
    with torch.no_grad():
        # the embedding rows are the head's rows, decoded
        rows = embedding(ids)
        torch.testing.assert_close(rows, head.effective_weight()[ids], rtol=1e-5, atol=1e-6)
        err = (rows - reference.get_input_embeddings()(ids)).norm() / reference.get_input_embeddings()(ids).norm()
        assert err < {16: 0.01, 8: 0.02, 4: 0.2}[head_bits]
        expected = model(ids).logits
    out = quipkit.save(model, smol_tokenizer, tmp_path / "q", config, CAL)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith("model.embed_tokens") for n in names)  # held once, by the head
    loaded, _ = quipkit.load(out)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        assert torch.equal(via_hf(ids).logits, expected)


def test_head_bits_32_keeps_the_float_head_and_16_halves_the_checkpoint(tmp_path, smol_tokenizer):
    sizes = {}
    for bits in (32, 16):
        model = _tied_model()
        config = make_config("rtn", 4, head_bits=bits)
        quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
        if bits == 32:
            assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
        out = quipkit.save(model, smol_tokenizer, tmp_path / f"q{bits}", config, CAL)
        sizes[bits] = (out / "model.safetensors").stat().st_size
    embedding_bytes = 256 * 64
    assert sizes[32] - sizes[16] == pytest.approx(2 * embedding_bytes, rel=0.05)


def test_bad_head_bits_is_a_clear_error():
    with pytest.raises(quipkit.QuipkitError, match="head_bits must be one of"):
        make_config("quip#", 2, head_bits=5)
