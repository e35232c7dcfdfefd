"""The honest account: the quantized share, the bits of the quantized part and of the whole model, and a
warning naming large weights left in float."""

import json

import pytest
import torch
import transformers

import quipkit
from quipkit.cli import main
from quipkit.config import CalibrationConfig, make_config
from quipkit.formats.account import checkpoint_account
from quipkit.formats.validate import safetensors_header
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model

CAL = CalibrationConfig(nsamples=8, seqlen=32, batch_size=4)


def _saved(model, folder, method="rtn", bits=4, **options):
    config = make_config(method, bits, **options)
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    total = sum(p.numel() for p in model.parameters())  # tied tensors once
    report = quantize_blockwise(model, tokens, config, CAL, torch.device("cpu"))
    out = quipkit.save(model, None, folder, config, CAL, {"layers": report.layers})
    return checkpoint_account(out), report, total, out


def _tiny_mixtral():
    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=256, max_position_embeddings=256)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_a_dense_model_is_almost_all_quantized_and_the_bits_add_up(tmp_path, tied):
    account, report, total, out = _saved(tiny_model(tie_word_embeddings=tied), tmp_path / "q", group_size=32)
    assert account.parameters == total
    assert account.embeddings == (1 if tied else 2) * 256 * 64
    norms = 5 * 64  # four block norms and the final one: the only non-embedding float
    assert account.quantized == total - account.embeddings - norms
    assert account.share == pytest.approx(1 - norms / (total - account.embeddings))
    assert account.quantized_bits == pytest.approx(report.bits_per_weight())
    header = safetensors_header(out / "model.safetensors")
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values()) * 8
    assert account.model_bits * account.parameters == pytest.approx(stored)
    assert account.warning() is None and account.float_weights == []


def test_large_weights_left_in_float_are_named_in_a_warning(tmp_path, capsys):
    # the experts excluded: most of a mixture-of-experts model stays float, and the run must say so
    account, _, total, out = _saved(_tiny_mixtral(), tmp_path / "moe", group_size=32, exclude=("experts",))
    assert account.parameters == total
    experts = 2 * 4 * (256 * 64 + 64 * 128)  # gate_up and down of 4 experts in 2 blocks
    assert account.unquantized >= experts and account.share < 0.2
    assert account.float_weights[0] == ("model.layers.0.mlp.experts.gate_up.0.weight", 256 * 64)
    text = account.warning()
    assert text.startswith("89% of the non-embedding parameters stayed in float") and "experts.gate_up.0" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_share"] == pytest.approx(account.share) and info["warnings"] == [text]
    assert main(["info", str(out)]) == 0
    assert f"quipkit: warning: {text}" in capsys.readouterr().err


def _tiny_gemma2():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                       max_position_embeddings=256)
    return transformers.Gemma2ForCausalLM(config).eval()


@pytest.mark.parametrize("build", [_tiny_gemma2, _tiny_mixtral], ids=["gemma2-tied-float-head", "mixtral-float-experts"])
def test_float_parts_load_back_in_transformers_with_the_same_logits(tmp_path, build):
    """A tied float head is stored once and still validates inside from_pretrained; float parts (experts,
    norms) load in the dtype they were saved in, not the bf16 head's."""
    model = build()
    _, _, _, out = _saved(model, tmp_path / "q")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
