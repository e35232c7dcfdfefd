import math

import pytest
import torch

from quipkit.eval.perplexity import Protocol, perplexity, protocol

from conftest import tiny_model


class _Chars:
    """A tokenizer with one token per character (ids < 256)."""

    def __call__(self, text):
        return {"input_ids": [ord(c) % 256 for c in text]}


def test_uniform_model_has_perplexity_equal_to_vocab_size():
    model = tiny_model(vocab_size=256)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: the uniform distribution
    proto = Protocol("chars", lambda: "abcdefgh" * 100, seqlen=64, windows=5)
    result = perplexity(model, _Chars(), proto)
    assert result["perplexity"] == pytest.approx(256, rel=1e-5)
    assert result["tokens"] == 5 * 63 and result["windows"] == 5


def test_matches_a_straightforward_computation():
    model = tiny_model(vocab_size=256)
    text = "".join(chr(97 + (i * 7) % 26) for i in range(1000))
    result = perplexity(model, _Chars(), Protocol("t", lambda: text, seqlen=100, windows=None), batch_size=3)
    ids = torch.tensor([ord(c) for c in text])[:1000].reshape(10, 100)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), -1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    assert result["perplexity"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_protocol_names():
    assert protocol("wikitext2").name == "wt2-512x40" and protocol("c4").name == "c4-512x40"
    assert protocol("wt2-2048-full").windows is None


@pytest.mark.slow
def test_reference_model_reproduces_28_74():
    from quipkit.models.loading import load_model

    model, tokenizer, _ = load_model(None)
    result = perplexity(model, tokenizer, protocol("wt2-512x40"))
    assert result["perplexity"] == pytest.approx(28.74, abs=0.02)
