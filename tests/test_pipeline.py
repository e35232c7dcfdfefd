"""The block-wise pipeline on tiny random models of several families: quantize, save, load, resume."""

import json

import pytest
import torch
import transformers

import quipkit
from quipkit.config import CalibrationConfig, make_config
from quipkit.console import Reporter
from quipkit.errors import QuipkitError
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.structure import find_blocks, select_linears
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model

CAL = CalibrationConfig(nsamples=16, seqlen=32, batch_size=4)


def _tokens(vocab=256, n=16, t=32, seed=0):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _quantized(family="llama", method="gptq", bits=4, **options):
    model = tiny_model(family)
    config = make_config(method, bits, **options)
    report = quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
    return model, report


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_finds_blocks_and_linears_by_type(family):
    model = tiny_model(family)
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    names = list(select_linears(blocks[0], f"{prefix}.0"))
    assert names == [f"model.layers.0.{n}" for n in
                     ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    only_mlp = select_linears(blocks[0], f"{prefix}.0", include=(r"mlp\.",), exclude=(r"down_proj",))
    assert list(only_mlp) == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_gptq_4bit_keeps_logits_close_and_replaces_every_linear(family):
    reference = tiny_model(family)
    model, report = _quantized(family, group_size=32)
    tokens = _tokens(seed=1)[:2]
    ref, out = reference(tokens).logits, model(tokens).logits
    # 4-bit groups of 32 on Gaussian weights err by ~8% per weight; logits stay within that
    assert (out - ref).norm() / ref.norm() < 0.12
    quantized = [m for m in model.model.layers.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 14 == len(report.layers)
    assert not any(type(m) is torch.nn.Linear for m in model.model.layers.modules())
    if family == "gemma":  # its head shares the matrix of an embedding that scales its rows: kept in float
        assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    else:  # the head on an 8-bit grid (head_bits=8, the default); the embeddings its rows or bf16
        assert model.lm_head.codebook.spec()["name"] == "scalar" and model.lm_head.codebook.bits == 8
        embedding = model.get_input_embeddings()
        assert embedding.tied or embedding.codebook.spec() == {"name": "dense", "bits": 16}
    if family == "qwen2":  # q/k/v carry biases; they survive quantization
        assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_gptq_beats_rtn_on_output_error():
    reference = tiny_model()
    tokens = _tokens(seed=2)[:4]
    ref = reference(tokens).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model, _ = _quantized(method=method, bits=3, group_size=32)
        errors[method] = float((model(tokens).logits - ref).detach().norm())
    assert errors["gptq"] < errors["rtn"]


def test_layers_sharing_an_input_share_the_input_transform():
    model, _ = _quantized(method="gptq", incoherence=True, group_size=32)
    attn = model.model.layers[0].self_attn
    assert int(attn.q_proj.seed_in) == int(attn.k_proj.seed_in) == int(attn.v_proj.seed_in)
    assert int(attn.q_proj.seed_in) != int(attn.o_proj.seed_in)
    assert int(attn.q_proj.seed_out) != int(attn.k_proj.seed_out)


def test_same_seed_same_model_other_seed_other_model():
    a, _ = _quantized(method="gptq", incoherence=True, group_size=32)
    b, _ = _quantized(method="gptq", incoherence=True, group_size=32)
    c, _ = _quantized(method="gptq", incoherence=True, group_size=32, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_include_exclude_and_nothing_selected():
    model, report = _quantized(include=(r"mlp",), group_size=32)
    assert {r["name"].split(".")[-1] for r in report.layers} == {"gate_proj", "up_proj", "down_proj"}
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    with pytest.raises(QuipkitError, match="no linear layer matched"):
        _quantized(include=(r"no_such_layer",))


def test_a_sequential_run_whose_first_group_is_left_out_rounds_against_the_float_blocks_hessian():
    # GPTQ's first pass sums only the first group's Hessian; the first *selected* group (gate/up here)
    # must still get its own, which with attention left float is the non-sequential run's (in block
    # 0: the next blocks' inputs come from the differently rounded down_proj)
    sequential, _ = _quantized(include=(r"mlp",), group_size=32)
    independent, _ = _quantized(include=(r"mlp",), group_size=32, sequential=False)
    for name in ("gate_proj", "up_proj"):
        ours = getattr(sequential.model.layers[0].mlp, name).state_dict()
        theirs = getattr(independent.model.layers[0].mlp, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    identity, _ = _quantized(include=(r"mlp",), group_size=32, act_order=False)
    plain_rtn = _quantized(method="rtn", include=(r"mlp",), group_size=32)[0]
    gate = lambda m: m.model.layers[0].mlp.gate_proj.state_dict()["codes"]  # noqa: E731
    assert not torch.equal(gate(identity), gate(plain_rtn))  # rounded through a real Hessian, not H = I


class _StopAfter(Reporter):
    """Raises KeyboardInterrupt when the block bar has advanced `blocks` times, like a Ctrl-C."""

    def __init__(self, blocks):
        self.blocks = blocks

    def task(self, description, total):
        outer = self

        class _Ctx:
            def __enter__(self_inner):
                class T:
                    count = 0

                    def advance(self_t, steps=1, status=None):
                        self_t.count += steps
                        if description == "blocks" and self_t.count >= outer.blocks and steps:
                            raise KeyboardInterrupt

                return T()

            def __exit__(self_inner, *exc):
                return False

        return _Ctx()


def test_interrupted_run_resumes_to_the_same_model(tmp_path):
    config = make_config("gptq", 3, group_size=32)
    straight = tiny_model()
    quantize_blockwise(straight, _tokens(), config, CAL, torch.device("cpu"))
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"), _StopAfter(1), tmp_path / "work")
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert state["next_block"] == 1
    fresh = tiny_model()
    report = quantize_blockwise(fresh, _tokens(), config, CAL, torch.device("cpu"), None, tmp_path / "work")
    assert report.resumed_from_block == 1
    a, b = straight.state_dict(), fresh.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = make_config("gptq", 4, group_size=32)
    with pytest.raises(QuipkitError, match="different settings"):
        quantize_blockwise(tiny_model(), _tokens(), other, CAL, torch.device("cpu"), None, tmp_path / "work")


def test_save_load_round_trip_and_transformers_loading(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    model, report = _quantized(method="gptq", bits=3, group_size=32, incoherence=True)
    config = make_config("gptq", 3, group_size=32, incoherence=True)
    out = quipkit.save(model, smol_tokenizer, tmp_path / "q", config, CAL, {"layers": report.layers})
    tokens = _tokens(seed=3)[:2]
    expected = model(tokens).logits
    loaded, _ = quipkit.load(out)
    assert torch.equal(loaded(tokens).logits, expected)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(via_hf(tokens).logits, expected)
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "quipkit" and len(quant["layers"]) == 15  # 14 linears and the bf16 head
    assert list(quant["embeddings"]) == ["model.embed_tokens"]


def test_checkpoint_size_reflects_stored_bits(tmp_path, smol_tokenizer):
    from safetensors import safe_open

    model, report = _quantized(method="rtn", bits=2, group_size=64)
    out = quipkit.save(model, smol_tokenizer, tmp_path / "q")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        quant_bytes = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                          for k in f.keys() if k.startswith("model.layers.") and not k.endswith(("norm.weight",)))
    weights = sum(r["shape"][0] * r["shape"][1] for r in report.layers)
    assert quant_bytes * 8 / weights == pytest.approx(report.bits_per_weight())
    # 2-bit codes, plus an fp16 scale and a 2-bit zero per 64 weights
    assert report.bits_per_weight() == pytest.approx(2 + (16 + 2) / 64, abs=0.01)


def test_hessian_cache_gives_the_same_model_without_forward_passes(tmp_path, monkeypatch):
    import quipkit.pipeline.blockwise as blockwise
    import quipkit.pipeline.head as head_module

    config = make_config("quip#", 2)
    straight = tiny_model()
    quantize_blockwise(straight, _tokens(), config, CAL, torch.device("cpu"))
    filled = tiny_model()
    quantize_blockwise(filled, _tokens(), config, CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")
    (folder,) = (tmp_path / "h").iterdir()
    assert len(list(folder.glob("block_*.safetensors"))) == 2
    assert (folder / "head.safetensors").is_file()  # the 8-bit head's Hessian, of the original model

    def no_forward(*args, **kwargs):
        raise AssertionError("a complete cache must not run the model")

    monkeypatch.setattr(blockwise, "collect_hessians", no_forward)
    monkeypatch.setattr(blockwise, "capture_block_calls", no_forward)
    monkeypatch.setattr(head_module, "capture_head_inputs", no_forward)
    cached = tiny_model()
    quantize_blockwise(cached, _tokens(), make_config("quip#", 2), CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")
    a, b, c = straight.state_dict(), filled.state_dict(), cached.state_dict()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    # another model's weights get their own entry, never the cached Hessians
    monkeypatch.undo()
    quantize_blockwise(tiny_model(seed=1), _tokens(), config, CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")
    assert len(list((tmp_path / "h").iterdir())) == 2


def test_hessian_cache_serves_runs_with_include_and_exclude(tmp_path, monkeypatch):
    import quipkit.pipeline.blockwise as blockwise
    from quipkit.pipeline.hessian_cache import HessianCache

    mlp_only = make_config("quip#", 2, include=("mlp",))
    quantize_blockwise(tiny_model(), _tokens(), mlp_only, CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")
    no_down = make_config("quip#", 2, exclude=("down_proj",))
    straight = tiny_model()
    quantize_blockwise(straight, _tokens(), no_down, CAL, torch.device("cpu"))

    def no_forward(*args, **kwargs):
        raise AssertionError("a complete cache must not run the model")

    monkeypatch.setattr(blockwise, "collect_hessians", no_forward)
    monkeypatch.setattr(blockwise, "capture_block_calls", no_forward)
    cached = tiny_model()
    report = quantize_blockwise(cached, _tokens(), no_down, CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")
    assert len(report.layers) == 12  # 7 linears a block, less down_proj, in 2 blocks: attention came from the cache
    a, b = straight.state_dict(), cached.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a cache without some layer's Hessian (written before caches held every linear) is refused, not skipped
    real = HessianCache.load
    monkeypatch.setattr(HessianCache, "load", lambda self, index: real(self, index)[1:])
    with pytest.raises(QuipkitError, match="the Hessian cache has no Hessian for model.layers.0"):
        quantize_blockwise(tiny_model(), _tokens(), no_down, CAL, torch.device("cpu"), hessian_cache=tmp_path / "h")



@pytest.mark.parametrize("method,bits,options", [("gptq", 4, {"group_size": 32}), ("qtip", 2, {"L": 10})])
def test_keep_decoded_gives_the_same_logits_and_is_never_saved(method, bits, options):
    """The held weight goes through the dense kernel, the codes through a decode kernel: the same
    numbers, summed in another order."""
    from quipkit.layers.quantized_linear import keep_decoded

    model, _ = _quantized(method=method, bits=bits, **options)
    tokens = _tokens(seed=2)[:2]
    with torch.no_grad():
        before = model(tokens).logits
        held = keep_decoded(model)
        after = model(tokens).logits
    assert held == 4 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert not any(k.endswith("decoded") for k in model.state_dict())
    keep_decoded(model, keep=False)
    assert all(m.decoded is None for m in model.modules() if isinstance(m, QuantizedLinear))


def _tiny_gemma3_vision_language():
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def test_a_vision_language_model_quantizes_its_language_blocks_and_blocks_can_be_named():
    from quipkit.models.structure import find_blocks

    model = _tiny_gemma3_vision_language()  # its vision tower has 4 blocks, its language model 2
    assert find_blocks(model)[0] == "model.language_model.layers"
    assert find_blocks(model, "model.vision_tower.encoder.layers")[0] == "model.vision_tower.encoder.layers"
    with pytest.raises(QuipkitError, match=r"--blocks model\.layers is not a list of blocks.*model\.language_model"):
        find_blocks(model, "model.layers")
    report = quantize_blockwise(model, _tokens(), make_config("rtn", 4, group_size=32), CAL, torch.device("cpu"))
    assert len(report.layers) == 14 and all(r["name"].startswith("model.language_model.layers.") for r in report.layers)
