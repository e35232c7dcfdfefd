"""End-to-end fine-tuning on a tiny model: the training form of a layer, the loss, the KL it lowers,
resuming, and the checkpoint round trip."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import quipkit
from quipkit.config import CalibrationConfig, make_config
from quipkit.eval.divergence import kl_on_windows
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline import finetune
from quipkit.pipeline.finetune import DecodedLinear, FinetuneOptions, finetune_e2e, teacher_targets, topk_kl

from conftest import tiny_model

CAL = CalibrationConfig(nsamples=16, seqlen=32, batch_size=4)
OPTIONS = FinetuneOptions(lr=1e-2, epochs=3, holdout=0.25, evals_per_epoch=1, patience=3, top_k=16)


def _tokens(n=16, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantized_pair():
    """(float model, its QuIP# 2-bit copy); weights large enough for peaked next-token distributions."""
    reference = tiny_model(initializer_range=0.3)
    model = copy.deepcopy(reference)
    quantize_blockwise(model, _tokens(), make_config("quip#", 2), CAL, torch.device("cpu"))
    return reference, model


def test_the_training_form_of_a_layer_computes_what_the_layer_computes(quantized_pair):
    _, model = quantized_pair
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear)
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(DecodedLinear(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_topk_kl_is_the_full_kl_when_k_covers_the_vocabulary_and_a_lower_bound_otherwise():
    gen = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 7, 50, generator=gen) * 3, torch.randn(2, 7, 50, generator=gen) * 3
    logp_full = teacher.log_softmax(-1)
    exact = (logp_full.exp() * (logp_full - student.log_softmax(-1))).sum(-1).mean()
    for k, close in ((50, True), (10, False)):
        logp, indices = logp_full.topk(k, dim=-1)
        rest = torch.log((1 - logp.exp().sum(-1)).clamp_min(1e-12))
        value = topk_kl(student, indices, logp, rest)
        if close:
            torch.testing.assert_close(value, exact, rtol=1e-4, atol=1e-5)
        else:  # coarsening the distributions can only lose divergence (the data processing inequality)
            assert 0 < float(value) < float(exact)


def _finetuned(quantized_pair, options=OPTIONS, work=None):
    reference, model = quantized_pair
    model = copy.deepcopy(model)
    tokens = _tokens(seed=1)
    record = finetune_e2e(model, tokens, teacher_targets(reference, tokens, options.top_k), options, work=work)
    return model, record


@pytest.fixture(scope="module")
def finetuned(quantized_pair):
    """(the QuIP# copy fine-tuned without interruption, its record)."""
    return _finetuned(quantized_pair)


def test_e2e_lowers_the_kl_on_held_out_text_and_keeps_the_codes(quantized_pair, finetuned):
    reference, before = quantized_pair
    after, record = finetuned
    assert record["held_out_kl_after"] < 0.9 * record["held_out_kl_before"]
    windows = _tokens(n=6, seed=7)  # text neither training nor early stopping saw
    kl = {label: kl_on_windows(model, reference, windows)[0] for label, model in (("before", before), ("after", after))}
    assert kl["after"] < 0.9 * kl["before"]
    for (name, a), b in zip(after.named_modules(), before.modules()):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.qweight, b.qweight), name
    moved = [n for n, a in after.named_buffers() if n.endswith((".su", ".sv"))
             and not torch.equal(a, dict(before.named_buffers())[n])]
    assert moved, "no sign vector was trained"


def _interrupted(pair, work, monkeypatch) -> None:
    """A run killed at its 8th step, after the first epoch's evaluation was saved."""
    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(KeyboardInterrupt):
        _finetuned(pair, work=work)
    monkeypatch.setattr(torch.optim.Adam, "step", real_step)


def test_an_interrupted_run_resumes_to_the_same_model_and_no_other_model_resumes_it(
        quantized_pair, finetuned, tmp_path, monkeypatch):
    straight, straight_record = finetuned
    _interrupted(quantized_pair, tmp_path, monkeypatch)
    reference, model = quantized_pair
    other = copy.deepcopy(model)
    other.model.layers[0].mlp.up_proj.sv.mul_(1.5)  # other codes' scale: the saved state is not its own
    found, _ = _finetuned((reference, other), work=tmp_path)
    alone, _ = _finetuned((reference, other))
    assert all(torch.equal(a, b) for a, b in zip(found.state_dict().values(), alone.state_dict().values()))
    _interrupted(quantized_pair, tmp_path, monkeypatch)
    resumed, record = _finetuned(quantized_pair, work=tmp_path)
    assert record == {**straight_record, "seconds": record["seconds"]}
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_fine_tuned_checkpoint_round_trips_with_identical_logits(finetuned, tmp_path, smol_tokenizer):
    model, record = finetuned
    out = quipkit.save(model, smol_tokenizer, tmp_path / "ft", make_config("quip#", 2), CAL, {"finetune": [record]})
    tokens = _tokens(n=2, seed=5)
    loaded, _ = quipkit.load(out)
    assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_block_fine_tuning_lowers_each_blocks_output_error_and_resumes(tmp_path):
    """The loss it optimises falls in every block; an interrupted run resumes to the same bytes."""
    from quipkit.pipeline.finetune import FinetuneOptions

    options = FinetuneOptions(lr=1e-2, epochs=4, holdout=0.25, patience=4)
    config = make_config("quip#", 2)
    straight = tiny_model(initializer_range=0.3)
    report = quantize_blockwise(straight, _tokens(), config, CAL, torch.device("cpu"), block_finetune=options)
    assert [b["block"] for b in report.block_finetune] == [0, 1]
    first, second = report.block_finetune
    assert first["held_out_mse_after"] < 0.9 * first["held_out_mse_before"], first
    assert second["held_out_mse_after"] <= second["held_out_mse_before"], second  # the best state, never worse
    su = straight.model.layers[0].mlp.up_proj.su
    assert (su.abs() != 1).any()  # the sign vector became a real scale

    calls = {"n": 0}
    real = finetune.finetune_block

    def second_block_dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    import quipkit.pipeline.blockwise as blockwise

    blockwise.finetune_block = second_block_dies
    try:
        with pytest.raises(KeyboardInterrupt):
            quantize_blockwise(tiny_model(initializer_range=0.3), _tokens(), config, CAL, torch.device("cpu"),
                               work_folder=tmp_path / "w", block_finetune=options)
    finally:
        blockwise.finetune_block = real
    resumed = tiny_model(initializer_range=0.3)
    again = quantize_blockwise(resumed, _tokens(), config, CAL, torch.device("cpu"), work_folder=tmp_path / "w",
                               block_finetune=options)
    assert again.resumed_from_block == 1
    assert [{**b, "seconds": 0} for b in again.block_finetune] == [{**b, "seconds": 0} for b in report.block_finetune]
    for (name, a), b in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("method, improves", [("gguf-iq4_nl", True), ("gguf-q4_1", False)])
def test_llama_cpp_block_scales_train_codes_stay_and_the_bytes_stay_llama_cpps(method, improves):
    """A gguf-* model's block scales (and Q4_1's minima) and norms train end to end: the training form
    computes what the layer computes, the held-out KL falls (IQ4_NL; this tiny Q4_1 model overfits from
    the first step, so the held-out check keeps it as it was), every code stays, and the trained blocks
    are what the gguf package's dequantizer reads as the weights the model now computes with."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    reference = tiny_model(initializer_range=0.3)
    model = copy.deepcopy(reference)
    quantize_blockwise(model, _tokens(), make_config(method, 4), CAL, torch.device("cpu"))
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(finetune.DecodedBlockScales(layer)(x), layer(x), rtol=1e-5, atol=1e-6)
    before = copy.deepcopy(model)
    # a scale per 32 weights is many parameters: more text than the QuIP# tests use, a smaller step
    tokens = torch.cat([_tokens(seed=seed) for seed in range(1, 5)])
    options = dataclasses.replace(OPTIONS, lr=1e-3, holdout=0.125)
    record = finetune_e2e(model, tokens, teacher_targets(reference, tokens, options.top_k), options)
    assert record["held_out_kl_after"] < (0.97 if improves else 1.0 + 1e-9) * record["held_out_kl_before"]
    kind = {"gguf-iq4_nl": GGMLQuantizationType.IQ4_NL, "gguf-q4_1": GGMLQuantizationType.Q4_1}[method]
    changed = 0
    for (name, a), b in zip(model.named_modules(), before.modules()):
        if isinstance(a, QuantizedLinear) and name != "lm_head":
            rows, cols = a.out_features, a.in_features
            assert torch.equal(a.codebook.unpack(a.codebook_tensors(), rows, cols)[0],
                               b.codebook.unpack(b.codebook_tensors(), rows, cols)[0]), name
            changed += not torch.equal(a.qweight, b.qweight)
            theirs = quants.dequantize(a.qweight.numpy(), kind).reshape(rows, cols)
            assert np.array_equal(theirs, a.effective_weight().numpy()), name
    assert bool(changed) == improves


@pytest.mark.parametrize("lr_bits", [4, 16])
def test_caldera_factors_train_on_their_grid_and_the_layer_stores_what_trained(lr_bits):
    """With factors on, L and R train like a LoRA adapter, rounded to their stored grid in every step:
    the training form computes what the layer computes, the restored model scores the held-out KL the
    run reported (the stored factors are the ones that trained), the main codes stay, factor codes move,
    and the held-out KL ends lower than with the factors frozen (bf16 factors at a smaller step: at
    1e-2 they overfit this tiny model's random text from the first evaluation)."""
    reference = tiny_model(initializer_range=0.3)
    model = copy.deepcopy(reference)
    config = make_config("caldera", 2, rank=8, lr_bits=lr_bits, lr_format="grid", outer_iters=1)
    quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(DecodedLinear(layer, factors=True)(x), layer(x), rtol=1e-5, atol=1e-5)
    tokens = _tokens(seed=1)
    targets = teacher_targets(reference, tokens, OPTIONS.top_k)
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(OPTIONS.seed))  # finetune_e2e's split
    held = order[:round(len(tokens) * OPTIONS.holdout)]
    runs = {}
    for factors in (False, True):
        tuned = copy.deepcopy(model)
        options = dataclasses.replace(OPTIONS, factors=factors, lr=OPTIONS.lr if lr_bits < 16 else 1e-3)
        runs[factors] = tuned, finetune_e2e(tuned, tokens, targets, options)
    tuned, record = runs[True]
    restored = finetune._held_out_kl(tuned, tokens, targets, held, torch.device("cpu"))
    assert restored == pytest.approx(record["held_out_kl_after"], rel=1e-3)
    assert record["held_out_kl_after"] < runs[False][1]["held_out_kl_after"]
    moved = 0
    for (name, a), b in zip(tuned.named_modules(), model.modules()):
        if isinstance(a, QuantizedLinear):
            assert torch.equal(a.qweight, b.qweight), name
        if getattr(a, "low_rank", None) is not None:
            factor = "lr_left_codes" if lr_bits < 16 else "lr_left_weight"
            moved += not torch.equal(getattr(a, factor), getattr(b, factor))
    assert moved, "no factor was trained"


def test_trellis_factors_stay_as_rounded_while_the_rest_trains():
    """Factors in a trellis code are folded into the frozen weight: the training form has no factor
    parameters and computes what the layer computes, and after a run the factors' codes and row scales
    are the ones quantization stored, while the layers' sign vectors moved."""
    reference = tiny_model(initializer_range=0.3)
    model = copy.deepcopy(reference)
    quantize_blockwise(model, _tokens(), make_config("caldera", 2, rank=16, lr_bits=2, outer_iters=1), CAL,
                       torch.device("cpu"))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.low_rank.codebook.name == "trellis"
    decoded = DecodedLinear(layer, factors=True)
    assert {name for name, _ in decoded.named_parameters()} == {"su", "sv"}
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(decoded(x), layer(x), rtol=1e-5, atol=1e-5)
    tuned = copy.deepcopy(model)
    tokens = _tokens(seed=1)
    finetune_e2e(tuned, tokens, teacher_targets(reference, tokens, OPTIONS.top_k), OPTIONS)
    for (name, a), b in zip(tuned.named_modules(), model.modules()):
        if getattr(a, "low_rank", None) is not None:
            for tensor in ("lr_left_codes", "lr_left_row_scales", "lr_right_codes", "lr_right_row_scales"):
                assert torch.equal(getattr(a, tensor), getattr(b, tensor)), (name, tensor)
            assert not torch.equal(a.sv, b.sv), name
