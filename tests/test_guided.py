"""Guided Hessians: the pipeline's per-row-group Hessians equal a brute-force computation, and every
LDLQ method rounds with them."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from quipkit.config import CalibrationConfig, make_config
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.guided import row_groups

from conftest import tiny_model

GUIDED = CalibrationConfig(nsamples=8, seqlen=32, batch_size=4, hessian="guided", guided_groups=4)


def _tokens(n=8, t=32, seed=0):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


def _brute_force(model, tokens, layer_name: str, groups: int) -> torch.Tensor:
    """[G, n, n]: sum over tokens of (sum over the group's rows of dL/dy^2) x x^T, over the token count;
    the loss the cross-entropy against the model's own argmax, summed, every sequence in one pass."""
    layer = model.get_submodule(layer_name)
    seen = {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    try:
        logits = model(input_ids=tokens, use_cache=False).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), logits.detach().argmax(-1).flatten(), reduction="sum")
    (grad,) = torch.autograd.grad(loss, seen["y"])
    x = seen["x"].detach().reshape(-1, layer.in_features).double()
    g = grad.reshape(-1, layer.out_features).double()
    rows = layer.out_features // groups
    out = []
    for k in range(groups):
        w = g[:, k * rows:(k + 1) * rows].pow(2).sum(1)
        out.append((x * w[:, None]).t() @ x / len(x))
    return torch.stack(out)


def test_guided_hessians_equal_a_brute_force_computation(tmp_path):
    model = tiny_model(initializer_range=0.3)
    reference = copy.deepcopy(model)
    tokens = _tokens()
    config = make_config("gptq", 4, sequential=False, propagate="original")  # cacheable: the float model's Hessians
    quantize_blockwise(model, tokens, config, GUIDED, torch.device("cpu"), hessian_cache=tmp_path / "h")
    (cache_file,) = tmp_path.glob("h/*/block_0000.safetensors")
    with safe_open(str(cache_file), "pt") as handle:
        names = json.loads(handle.metadata()["groups"])
    stored = load_file(str(cache_file))
    assert all(len(group) == 1 for group in names)  # guided: q, k and v each have their own
    checked = 0
    for i, (name,) in enumerate(names):
        layer = reference.get_submodule(name)
        groups = row_groups(layer.out_features, 4)
        expected = _brute_force(reference, tokens, name, groups)
        assert stored[f"h{i}"].shape == expected.shape
        torch.testing.assert_close(stored[f"h{i}"], expected, rtol=2e-4, atol=1e-6 * float(expected.abs().max()))
        checked += 1
    assert checked == 7
    assert row_groups(64, 4) == 4 and row_groups(32, 4) == 2 and row_groups(24, 4) == 1


@pytest.mark.parametrize("method,bits,options", [
    ("gptq", 3, {}),  # true-sequential: later groups' guided Hessians from the block as it is then
    ("qtip", 2, {"L": 8}),  # 16-row trellis tiles: row groups of whole tiles
    pytest.param("gptq", 4, {"sequential": False}, marks=pytest.mark.slow),
    pytest.param("quip", 2, {}, marks=pytest.mark.slow),
    pytest.param("quip#", 2, {}, marks=pytest.mark.slow),
])
def test_every_ldlq_method_rounds_with_guided_hessians(method, bits, options):
    model = tiny_model(initializer_range=0.3)
    report = quantize_blockwise(model, _tokens(), make_config(method, bits, **options), GUIDED, torch.device("cpu"))
    assert len(report.layers) == 14
    assert all(0 < r["proxy"] < 1 for r in report.layers), [r["proxy"] for r in report.layers]
    logits = model(_tokens(n=2, seed=3)).logits
    assert torch.isfinite(logits).all()


def test_a_mixture_of_experts_model_is_refused_in_one_line():
    from quipkit.errors import QuipkitError
    from test_experts import _moe

    with pytest.raises(QuipkitError, match="guided Hessians do not cover mixture-of-experts layers yet.*--hessian input"):
        quantize_blockwise(_moe("mixtral"), _tokens(), make_config("gptq", 4), GUIDED, torch.device("cpu"))
