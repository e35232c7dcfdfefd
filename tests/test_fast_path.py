"""Quantized models on the fast path: the same logits as the eager reference, through torch.compile
too, and checkpoints written before the trellis layout changed still load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import quipkit
from quipkit import native
from quipkit.config import make_config
from quipkit.kernels import dispatch
from quipkit.layers.packing import pack_bits, unpack_bits

from test_pipeline import CAL, _quantized, _tokens


@pytest.fixture(scope="module")
def quip_sharp_model():
    model, _ = _quantized(method="quip#", bits=2)
    return model


def _in_reference_mode(run, monkeypatch):
    """run() with every layer routed to the eager reference (QUIPKIT_KERNELS=reference)."""
    monkeypatch.setenv("QUIPKIT_KERNELS", "reference")
    dispatch.forget_choices()
    try:
        with torch.no_grad():
            return run()
    finally:
        monkeypatch.delenv("QUIPKIT_KERNELS")
        dispatch.forget_choices()


def _reference_logits(model, tokens, monkeypatch) -> torch.Tensor:
    return _in_reference_mode(lambda: model(tokens).logits, monkeypatch)


@pytest.mark.parametrize("method,bits,options", [("quip#", 2, {}), ("quip#", 4, {}), ("qtip", 2, {"L": 10}),
                                                 ("gptq", 4, {"group_size": 32}), ("quip", 3, {})])
def test_fast_kernels_give_the_reference_logits(method, bits, options, monkeypatch):
    model, _ = _quantized(method=method, bits=bits, **options)
    for tokens in (_tokens(seed=5)[:1, :1], _tokens(seed=5)[:2]):  # one decode step, and a prefill
        with torch.no_grad():
            fast = model(tokens).logits
        torch.testing.assert_close(fast, _reference_logits(model, tokens, monkeypatch), rtol=1e-4, atol=1e-5)


def test_torch_compile_of_a_quantized_model_gives_the_same_logits(quip_sharp_model):
    tokens = _tokens(seed=6)[:2, :8]
    with torch.no_grad():
        eager = quip_sharp_model(tokens).logits
        compiled = torch.compile(quip_sharp_model)(tokens).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_format_1_trellis_checkpoints_load_with_the_same_logits(tmp_path, smol_tokenizer):
    """Format 1 packed each tile's chunks first-to-last; loading converts them to format 2."""
    from transformers import AutoModelForCausalLM

    model, _ = _quantized(method="qtip", bits=2, L=10)
    out = quipkit.save(model, smol_tokenizer, tmp_path / "q", make_config("qtip", 2, L=10), CAL)
    tokens = _tokens(seed=7)[:2]
    with torch.no_grad():
        expected = model(tokens).logits
    state = load_file(out / "model.safetensors")
    for name in [n for n in state if n.endswith(".codes") and n.startswith("model.layers.")]:  # not the head's
        chunks = unpack_bits(state[name], 2, 256).flip(-1)  # back to first-to-last
        state[name] = pack_bits(chunks, 2)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (out / "config.json").write_text(json.dumps(config))
    loaded, _ = quipkit.load(out)
    via_hf = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)
        assert torch.equal(via_hf(tokens).logits, expected)


def test_a_machine_without_the_extension_runs_the_reference():
    """QUIPKIT_NATIVE=0 hides the compiled extension, as on a machine without a C compiler."""
    code = (
        "import torch, quipkit\n"
        "from quipkit import native\n"
        "from quipkit.codebooks import make_codebook\n"
        "from quipkit.kernels import dispatch\n"
        "cb = make_codebook({'name': 'e8p', 'bits': 2})\n"
        "print(native.available(), dispatch.select_kernel(torch.zeros(1, 64), cb, 16, 64).name,"
        " dispatch.select_hadamard(torch.zeros(1, 64)).name)\n"
    )
    env = {**os.environ, "QUIPKIT_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "reference", "reference"]


def test_a_layer_on_the_dct_fallback_matches_the_reference(monkeypatch):
    """10920 has no Hadamard factor: the input side takes the DCT (reference op), the codes the fast kernel."""
    from quipkit.layers.quantized_linear import QuantizedLinear
    from quipkit.transforms.rht import random_signs

    from test_kernels import assert_matches, random_stored

    layer = QuantizedLinear(10920, 64, {"name": "e8p", "bits": 2}, {"name": "rht"})
    for name, tensor in zip(layer._codebook_names, random_stored(layer.codebook, 64, 10920, seed=3)):
        setattr(layer, name, tensor)
    layer.su, layer.sv = random_signs(10920, 1), random_signs(64, 2)
    x = torch.randn(2, 10920, generator=torch.Generator().manual_seed(4))
    assert layer._fast_path() is None  # the one-call path needs Hadamard factors on both sides
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setenv("QUIPKIT_KERNELS", "reference")
        dispatch.forget_choices()
        try:
            reference = layer(x)
        finally:
            monkeypatch.delenv("QUIPKIT_KERNELS")
            dispatch.forget_choices()
    assert_matches(fast, reference)  # sums of 10920 products: float32 rounding relative to the output scale


@pytest.mark.parametrize("method,bits,options", [("quip#", 2, {}), ("qtip", 2, {"L": 10}), ("gptq", 4, {"group_size": 32}),
                                                 ("caldera", 2, {"rank": 16})])
def test_bound_one_row_calls_give_the_layers_forward(method, bits, options, monkeypatch):
    """The lean decoder's per-layer calls with the tensors fixed: the layer's own output for one row;
    none for a layer the one-call path does not cover (a low-rank term) or in reference-only mode."""
    from quipkit.layers.quantized_linear import QuantizedLinear

    model, _ = _quantized(method=method, bits=bits, **options)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for i, layer in enumerate(layers):
        call = layer.bound_one_row_call()
        if layer.low_rank is not None or not native.available():
            assert call is None
            continue
        x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            torch.testing.assert_close(call(x), layer(x), rtol=0, atol=0)
            expected = _in_reference_mode(lambda: layer(x), monkeypatch)
            torch.testing.assert_close(call(x), expected, rtol=1e-4, atol=1e-5)
    assert _in_reference_mode(lambda: [layer.bound_one_row_call() for layer in layers], monkeypatch) == [None] * len(layers)
