"""Mixture-of-experts: fused experts unfused into one linear per expert matrix, every expert quantized from
the tokens routed to it, rare experts' Hessians completed (and recorded), checkpoints that load back."""

import json

import pytest
import torch
import transformers

import quipkit
from quipkit.config import CalibrationConfig, make_config
from quipkit.formats.account import checkpoint_account
from quipkit.models.experts import ExpertLinears, find_fused_experts, unfuse_experts
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.expert_hessians import complete_expert_hessians

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=256, max_position_embeddings=256)
MOES = {
    "mixtral": (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": (transformers.Qwen3MoeConfig, dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=64)),
    "gpt-oss": (transformers.GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                intermediate_size=64)),  # transposed, interleaved, biases
}


def _moe(arch: str, seed: int = 0):
    config_class, extra = MOES[arch]
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_class(**{**SMALL, **extra})).eval()


def _tokens(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", list(MOES))
def test_unfused_experts_compute_what_the_fused_ones_do(arch):
    model = _moe(arch)
    probe = _tokens(2, 16, seed=1)
    with torch.no_grad():
        expected = model(probe).logits
        names = unfuse_experts(model)
        got = model(probe).logits
    assert len(names) == 2 and all(isinstance(model.get_submodule(n), ExpertLinears) for n in names)
    assert find_fused_experts(model) == {}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_every_expert_matrix_of_a_mixtral_is_quantized_and_loads_back(tmp_path):
    model = _moe("mixtral")
    config = make_config("quip#", 2)
    calibration = CalibrationConfig(nsamples=8, seqlen=32, batch_size=4)
    report = quantize_blockwise(model, _tokens(), config, calibration, torch.device("cpu"))
    out = quipkit.save(model, None, tmp_path / "q", config, calibration, {"layers": report.layers})
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["experts"] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for block in (0, 1):
        for matrix, shape in (("gate_up", [256, 64]), ("down", [64, 128])):
            for e in range(4):
                name = f"model.layers.{block}.mlp.experts.{matrix}.{e}"
                assert name in quant["layers"]
                assert next(r for r in report.layers if r["name"] == name)["shape"] == shape
    account = checkpoint_account(out)
    assert account.share > 0.99 and account.warning() is None  # only the routers (4 x 64 each) stay float
    assert account.quantized_bits == pytest.approx(report.bits_per_weight())
    probe = _tokens(2, 16, seed=2)
    with torch.no_grad():
        expected = model(probe).logits
        loaded, _ = quipkit.load(out)
        via_hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(loaded(probe).logits, expected)
        assert torch.equal(via_hf(probe).logits, expected)


def test_experts_that_saw_few_tokens_get_a_blended_hessian_and_it_is_recorded():
    model = _moe("mixtral")
    config = make_config("gptq", 4, group_size=32)
    calibration = CalibrationConfig(nsamples=2, seqlen=8, batch_size=2)  # 16 tokens, 32 routings over 4 experts
    report = quantize_blockwise(model, _tokens(2, 8), config, calibration, torch.device("cpu"))
    experts = [r for r in report.layers if ".experts." in r["name"]]
    assert len(experts) == 2 * 2 * 4
    assert all(any("blended toward" in w for w in r["warnings"]) for r in experts)  # every one: < 64 tokens
    assert all(r["proxy"] < 1 for r in experts)


def test_the_blend_follows_the_token_counts():
    eye = torch.eye(4, dtype=torch.float64)
    h0, h1 = 2 * eye, 4 * eye
    groups = [(["e.gate_up.0"], h0), (["e.gate_up.1"], h1), (["attn.q"], eye)]
    tokens = {"e.gate_up.0": 8, "e.gate_up.1": 1, "attn.q": 3}
    inputs = {"e.gate_up.0": 4, "e.gate_up.1": 4, "e.gate_up.2": 4, "attn.q": 4}
    completed, notes = complete_expert_hessians(groups, tokens, inputs)
    by_name = {names[0]: h for names, h in completed}
    average = (8 * h0 + 1 * h1) / 9
    torch.testing.assert_close(by_name["e.gate_up.0"], h0)  # enough tokens: its own
    torch.testing.assert_close(by_name["e.gate_up.1"], (1 * h1 + 3 * average) / 4)
    torch.testing.assert_close(by_name["e.gate_up.2"], average)  # no token at all
    torch.testing.assert_close(by_name["attn.q"], eye)  # not an expert: untouched, though few tokens
    assert sorted(notes) == ["e.gate_up.1", "e.gate_up.2"] and "saw 0 calibration tokens" in notes["e.gate_up.2"]


def test_the_block_search_never_takes_an_experts_list_for_the_blocks():
    model = _moe("mixtral")
    unfuse_experts(model)  # each experts module now holds lists of 4 linears, longer than the 2 blocks
    from quipkit.models.structure import find_blocks

    assert find_blocks(model)[0] == "model.layers"
