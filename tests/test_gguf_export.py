"""GGUF export of gguf-* checkpoints: every tensor readable by llama.cpp's reference (the gguf package)
as exactly the weights quipkit computes with, and the file loadable by transformers' GGUF reader with
the same logits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFReader, quants

import quipkit
from quipkit.cli import main
from quipkit.config import make_config
from quipkit.formats.gguf_export import export_gguf, gguf_name, rotary_rows
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.loading import default_gguf
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model
from test_pipeline import CAL, _tokens

VOCAB = 49152  # SmolLM2's, so its GGUF's tokenizer fits


def _source_gguf():
    source = default_gguf()
    return os.path.join(source.location, source.gguf_file)


def _checkpoint(folder, method="gguf-q4_0", tied=False, tokenizer=None, **shape):
    model = tiny_model(vocab_size=VOCAB, tie_word_embeddings=tied, **shape)
    config = make_config(method, {"gguf-q8_0": 8, "gguf-q3_k": 3, "gguf-q2_k": 2}.get(method, 4))
    report = quantize_blockwise(model, _tokens(vocab=VOCAB), config, CAL, torch.device("cpu"))
    return model, quipkit.save(model, tokenizer, folder, config, CAL, {"layers": report.layers})


@pytest.mark.parametrize("method, tied", [("gguf-q4_0", True), ("gguf-q4_1", False), ("gguf-q4_k", False),
                                          ("gguf-q3_k", True)])
def test_exported_tensors_are_the_weights_quipkit_computes_with(tmp_path, method, tied):
    # k-quants: down_proj's rows are 256 long (the k-quant), the others' 64 (IQ4_NL in its place)
    model, out = _checkpoint(tmp_path / "q", method, tied, intermediate_size=256 if method.endswith("_k") else 128)
    path = export_gguf(out, tmp_path / "model.gguf", _source_gguf(), embeddings="bf16")  # the same weights, exactly
    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) is not tied  # a tied head is token_embd, once
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear) or name == "lm_head":
            continue
        stored = tensors[gguf_name(name + ".weight")]  # the names themselves: checked by transformers' reader below
        weight = module.effective_weight()
        if name.endswith(("q_proj", "k_proj")):
            weight = rotary_rows(weight, heads if name.endswith("q_proj") else kv_heads)
        theirs = quants.dequantize(np.asarray(stored.data), stored.tensor_type)
        assert np.array_equal(theirs.reshape(weight.shape), weight.numpy()), name
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == GGUFReader(_source_gguf()).fields[
        "tokenizer.ggml.tokens"].contents()[:3]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    tokens = _tokens(vocab=VOCAB, seed=9)[:2]
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, model(tokens).logits, atol=1e-5, rtol=1e-5)


def test_the_tokenizer_converted_from_tokenizer_json_is_the_source_ggufs(tmp_path, smol_tokenizer):
    _, out = _checkpoint(tmp_path / "q", tokenizer=smol_tokenizer)
    path = export_gguf(out, tmp_path / "model.gguf", log=lambda text: None)
    ours, source = GGUFReader(str(path)).fields, GGUFReader(_source_gguf()).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        assert ours[key].contents() == source[key].contents(), key
    assert ours["tokenizer.ggml.model"].contents() == "gpt2"
    assert ours["tokenizer.ggml.eos_token_id"].contents() == source["tokenizer.ggml.eos_token_id"].contents()


def test_cli_exports_and_refuses_what_llama_cpp_cannot_read(tmp_path, capsys):
    _, out = _checkpoint(tmp_path / "q")
    target = tmp_path / "m.gguf"
    assert main(["export", str(out), "--format", "gguf", "--out", str(target), "--tokenizer-from", _source_gguf()]) == 0
    assert target.is_file() and not (tmp_path / "m.gguf.partial").exists()
    embedding = next(t for t in GGUFReader(str(target)).tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type.name == "Q8_0"  # by default, as llama-quantize writes a 4-bit file's
    ours = quipkit.load(out)[0].get_input_embeddings().weight.detach().float().numpy()
    theirs = quants.dequantize(np.asarray(embedding.data), embedding.tensor_type).reshape(ours.shape)
    assert np.abs(theirs - ours).max() <= np.abs(ours).max() / 127
    assert main(["export", str(out), "--out", str(target)]) != 0
    assert "exists; pass --overwrite" in capsys.readouterr().err
    model = tiny_model(vocab_size=VOCAB)
    config = make_config("quip#", 2)
    report = quantize_blockwise(model, _tokens(vocab=VOCAB), config, CAL, torch.device("cpu"))
    other = quipkit.save(model, None, tmp_path / "e8p", config, CAL, {"layers": report.layers})
    assert main(["export", str(other), "--out", str(tmp_path / "x.gguf")]) != 0
    err = capsys.readouterr().err
    assert "llama.cpp cannot read model.layers.0.self_attn.q_proj (e8p) and others" in err
    assert "GGUF takes gguf-q4_0, gguf-q4_1, gguf-q8_0, gguf-iq4_nl, gguf-q4_k, gguf-q3_k, gguf-q2_k" in err
    assert len(err.strip().splitlines()) == 2  # the "exporting" line and the one-line refusal
    assert not (tmp_path / "x.gguf").exists()
