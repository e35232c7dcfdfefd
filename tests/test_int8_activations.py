"""The integer-activation path (`--int8-activations`): the rounding against known answers, the C
rounding against the Python oracle element for element, every integer kernel in every tier against
the reference fed the rounded activations, and the layers it does not serve left exactly as they were."""

from __future__ import annotations

import json

import pytest
import torch

from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.codebooks.trellis import ONE_MAD_INCREMENT
from quipkit.kernels import activations, cpu, dispatch
from quipkit.kernels.ops import decode_matmul
from quipkit.kernels.reference import reference_matmul
from test_kernels import assert_matches, fits, needs_native, random_stored, tier  # noqa: F401  (tier: a fixture)

ROUNDED = [{"name": "e8p", "bits": 2}, {"name": "scalar", "bits": 4, "group_size": 128},
           {"name": "scalar", "bits": 8, "group_size": 64}, {"name": "scalar", "bits": 4, "group_size": 64,
                                                             "symmetric": True},
           {"name": "uniform", "bits": 4}, {"name": "uniform", "bits": 8},
           {"name": "trellis", "bits": 2, "L": 12, "code": "1mad"}, {"name": "trellis", "bits": 2, "L": 16, "code": "1mad"},
           {"name": "trellis", "bits": 4, "L": 16, "code": "1mad"},
           {"name": "trellis", "bits": 2, "L": 12, "code": "1mad", "increment": ONE_MAD_INCREMENT},
           {"name": "trellis", "bits": 2, "L": 16, "code": "1mad", "increment": ONE_MAD_INCREMENT}]
NOT_ROUNDED = [{"name": "rvq", "bits": 4}, {"name": "scalar", "bits": 4, "group_size": 32},
               {"name": "scalar", "bits": 2, "group_size": 128}, {"name": "trellis", "bits": 2, "L": 16, "code": "3inst"},
               {"name": "trellis", "bits": 2, "L": 16, "code": "hyb"}, {"name": "dense", "bits": 16}]
SHAPES = [(576, 576), (192, 576), (576, 1536), (64, 128), (33, 64)]


@pytest.fixture
def int8():
    activations.set_activations("int8")
    yield
    activations.set_activations("float")


def test_rounding_known_answers():
    x = torch.zeros(2, 128)
    x[0, :64] = torch.linspace(-2.0, 2.0, 64)  # amax 2: q = round(x * 63.5)
    x[0, 64] = 1.0  # a block whose only nonzero is its amax, the rest exact zeros
    q, scales = activations.quantize(x)
    assert scales.shape == (2, 2) and torch.equal(scales[1], torch.zeros(2))  # all-zero blocks: scale 0, q 0
    assert scales[0, 0].item() == pytest.approx(2.0 / 127) and q[0, 0].item() == -127 and q[0, 63].item() == 127
    assert q[0, 64].item() == 127 and torch.equal(q[0, 65:], torch.zeros(63, dtype=torch.int8))
    assert torch.equal(q[0, :64].float(), (x[0, :64] * torch.tensor(127.0) / 2.0).round())
    ties = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -2.5] + [0.0] * 58])  # amax 127: x * 1 exactly
    assert activations.quantize(ties)[0][0, :6].tolist() == [127, 0, 2, 2, 0, -2]  # halves to even
    bad = torch.randn(1, 128)
    bad[0, 3], bad[0, 70] = float("nan"), float("inf")
    q, scales = activations.quantize(bad)
    assert scales.isnan().all() and (q == 0).all()
    assert (activations.rounded(torch.randn(3, 64)) - torch.randn(3, 64)).isfinite().all()


def test_rounded_error_is_within_half_a_step():
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0)) * 3
    step = x.reshape(4, -1, 64).abs().amax(-1, keepdim=True) / 127
    assert ((activations.rounded(x) - x).reshape(4, -1, 64).abs() <= step / 2 * (1 + 1e-6)).all()


def test_unknown_kind_is_a_one_line_error():
    with pytest.raises(ValueError, match="activations must be one of"):
        activations.set_activations("int4")


@needs_native
def test_the_c_rounding_is_the_python_rounding_element_for_element(int8, tier):
    """An 8-bit grid whose weight is the identity returns the rounded activations themselves."""
    n = 192
    codebook = make_codebook({"name": "scalar", "bits": 8, "group_size": 64})
    codes = torch.eye(n, dtype=torch.uint8)
    scales = torch.ones(n, 3, dtype=torch.float16)
    zeros = torch.zeros(n * 3, dtype=torch.uint8)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(1)) * 5
    x[0, :64] = torch.arange(64) - 31.5  # amax 32.5: many products land near halves
    x[1, 64:128] = 0.0
    x[2, 7] = float("nan")
    y = cpu.matvec(x, [codes, scales, zeros], codebook, n, n)
    expected = activations.rounded(x)
    assert torch.equal(y[:2], expected[:2])
    assert y[2].isnan().all()  # as in x W^T, where NaN x 0 is NaN: the NaN reaches every output of its row


@needs_native
def test_the_compiled_rounding_of_prefill_rows_is_the_oracle():
    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(3)) * 4
    x[5, :64] = torch.arange(64) - 31.5
    x[6, 64:128] = 0.0
    x[7, 200] = float("-inf")
    fast, oracle = activations.rounded_fast(x), activations.rounded(x)
    assert torch.equal(fast[:7], oracle[:7]) and torch.equal(fast[8:], oracle[8:])
    assert fast[7, 192:256].isnan().all() and oracle[7, 192:256].isnan().all()
    assert torch.equal(fast[7, :192], oracle[7, :192])


@needs_native
@pytest.mark.parametrize("spec", ROUNDED, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_integer_kernels_match_the_reference_on_rounded_activations(spec, int8, tier):
    codebook = make_codebook(spec)
    for i, (rows, cols) in enumerate(SHAPES):
        if not fits(codebook, rows, cols):
            continue
        assert activations.rounds(codebook, cols)
        stored = random_stored(codebook, rows, cols, seed=i)
        for batch in (1, 3, 8, 9):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            oracle = reference_matmul(activations.rounded(x), stored, codebook, rows, cols)
            assert_matches(decode_matmul(x, stored, dispatch.spec_of(codebook), rows, cols), oracle)  # matvec, or tiled GEMM at 9
            unrounded = reference_matmul(x, stored, codebook, rows, cols)
            assert (oracle - unrounded).abs().max() > 20 * 2e-5 * oracle.abs().max()  # the rounding is seen


@needs_native
@pytest.mark.parametrize("spec", NOT_ROUNDED, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_layers_without_an_integer_kernel_are_untouched(spec, int8):
    codebook = make_codebook(spec)
    rows, cols = 64, 128
    assert not activations.rounds(codebook, cols)
    stored = random_stored(codebook, rows, cols, seed=2)
    x = torch.randn(2, cols, generator=torch.Generator().manual_seed(2))
    with_int8 = decode_matmul(x, stored, dispatch.spec_of(codebook), rows, cols)
    activations.set_activations("float")
    assert torch.equal(with_int8, decode_matmul(x, stored, dispatch.spec_of(codebook), rows, cols))
    # and a row length that is not whole blocks keeps float activations for a codebook that has the kernel
    activations.set_activations("int8")
    assert not activations.rounds(make_codebook({"name": "e8p", "bits": 2}), 40)


@needs_native
def test_the_one_call_path_rounds_after_the_input_transform(int8):
    """QuantizedLinear's fast path (input Hadamard, matvec, output Hadamard in one C call) rounds what
    the matvec sees, as the op path does after its own transform."""
    from quipkit.kernels.ops import hadamard
    from quipkit.transforms.rht import random_signs

    codebook = make_codebook({"name": "e8p", "bits": 2})
    rows, cols = 192, 576
    stored = random_stored(codebook, rows, cols, seed=5)
    su, sv = random_signs(cols, seed=1).half(), random_signs(rows, seed=2).half()
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(6))
    fast = cpu.one_call_linear(codebook, rows, cols, "rht", stored, (su, sv, None))
    rotated = hadamard(x, su.float(), None, True)
    inner = reference_matmul(activations.rounded(rotated), stored, codebook, rows, cols)
    assert_matches(fast(x, stored, su, sv, None), hadamard(inner, None, sv.float(), False))


@needs_native
@pytest.mark.parametrize("method,bits,options", [("quip#", 2, {}), ("gptq", 4, {"group_size": 64}),
                                                 ("qtip", 2, {"L": 12})])
def test_generation_with_int8_activations_matches_transformers_and_stays_close(method, bits, options):
    """The lean decoder (prefill through the layers' ops, decoding through bound C calls) and
    transformers' generate see the same rounded numbers, so they pick the same tokens; the logits move
    by the rounding, and only a little."""
    from quipkit.generation import generate
    from test_generation import _transformers_tokens
    from test_pipeline import _quantized, _tokens

    model = _quantized(method=method, bits=bits, **options)[0]
    ids = _tokens(seed=8)[:1, :12]
    with torch.no_grad():
        float_logits = model(ids).logits
        activations.set_activations("int8")
        try:
            int8_logits = model(ids).logits
            tokens, _ = generate(model, ids, 10)
            assert tokens == _transformers_tokens(model, ids, 10)
        finally:
            activations.set_activations("float")
    change = (int8_logits - float_logits).norm() / float_logits.norm()
    assert 1e-5 < change < 0.02


def test_cli_int8_activations(capsys, tmp_path, smol_tokenizer):
    from quipkit import cli
    from conftest import tiny_model

    folder = tmp_path / "tiny"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    try:
        code = cli.main(["generate", str(folder), "Hello", "--max-new-tokens", "2", "--no-chat", "--stats", "--json",
                         "--int8-activations"])
        out = capsys.readouterr().out
        assert code == 0 and json.loads(out[out.index("{"):])["activations"] == "int8"
    finally:
        activations.set_activations("float")
    assert cli.main(["eval", str(folder), "--decode-once", "--int8-activations"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --decode-once" in err[0]


def test_cli_generate_rounds_activations_by_default_where_integer_kernels_run(capsys, tmp_path, smol_tokenizer):
    """generate's default is int8 on a CPU tier with the integer kernels, float elsewhere and with
    --float-activations; the setting lasts for the command only."""
    from quipkit import cli
    from quipkit.kernels.info import machine
    from conftest import tiny_model

    folder = tmp_path / "tiny"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    base = ["generate", str(folder), "Hello", "--max-new-tokens", "2", "--no-chat", "--stats", "--json"]
    expected = "int8" if machine()["integer_kernels"] else "float"
    for extra, kind in (([], expected), (["--float-activations"], "float")):
        assert cli.main(base + extra) == 0
        out = capsys.readouterr().out
        assert json.loads(out[out.index("{"):])["activations"] == kind
        assert activations.activations() == "float"
    assert cli.main(base + ["--int8-activations", "--float-activations"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "contradict" in err[0]
