"""CALDERA: Q + L R with quantized factors. The alternation lowers the proxy on a real layer, the
factors decode exactly as fitted, the bits count them, and checkpoints load back with equal logits."""

from __future__ import annotations

import os

import pytest
import torch

import quipkit
from quipkit.codebooks.low_rank import LowRank
from quipkit import native
from quipkit.config import make_config
from quipkit.errors import QuipkitError
from quipkit.kernels import dispatch
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.layer_group import quantize_group
from quipkit.rounding.caldera import LayerHessian, _svd_factors, fit_low_rank

from conftest import tiny_model
from test_pipeline import CAL, _tokens


@pytest.fixture(scope="module")
def real_layer(smol_tokenizer):
    """Block 0's v_proj of the reference model [192, 576] and its real input Hessian: the RMS-normed
    token embeddings of WikiText-2 text."""
    from gguf import GGUFReader, quants

    from quipkit.corpora import wikitext2
    from quipkit.models.loading import default_gguf

    source = default_gguf()
    tensors = {t.name: t for t in GGUFReader(os.path.join(source.location, source.gguf_file)).tensors}

    def read(name, rows=None):
        t = tensors[name]
        data = t.data if rows is None else t.data[rows]
        return torch.from_numpy(quants.dequantize(data, t.tensor_type).copy()).float()

    ids = smol_tokenizer(wikitext2("validation")[:20000], return_tensors="pt").input_ids[0, :2048]
    x = read("token_embd.weight", ids.numpy())  # [tokens, 576]
    x = x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-5) * read("blk.0.attn_norm.weight")
    linear = torch.nn.Linear(576, 192, bias=False)
    linear.weight.data = read("blk.0.attn_v.weight")
    return linear, (x.t() @ x / x.shape[0]).double()


def _quantize(linear, hessian, method, **options):
    [(layer, record)] = quantize_group({"v": linear}, hessian.clone(), make_config(method, 2, **options),
                                       torch.device("cpu"))
    return layer, record


def test_the_alternation_lowers_the_proxy_at_every_outer_iteration_on_a_real_layer(real_layer):
    linear, hessian = real_layer
    _, plain = _quantize(linear, hessian, "quip#")
    layer, record = _quantize(linear, hessian, "caldera", rank=32, outer_iters=3)
    steps = record.iterations
    # each step is kept only when it lowers the loss: never up, and the alternation does lower it
    assert len(steps) == 3 and all(b <= a for a, b in zip(steps, steps[1:])) and steps[-1] < steps[0], steps
    assert record.proxy == pytest.approx(steps[-1], rel=1e-3)
    assert record.proxy < 0.7 * plain.proxy
    m, n, k = 192, 576, 32
    factor_bits = k * (m + n) * 4 / (m * n)  # 4-bit codes of L and R, before their group scales
    assert record.bits == pytest.approx(layer.stored_bits() / (m * n))
    assert plain.bits + factor_bits < record.bits < plain.bits + 1.2 * factor_bits


@pytest.mark.parametrize("rows, cols", [(70, 48), (40, 96)])  # tall: Gram of the columns; wide: of the rows
def test_the_weighted_rank_k_fit_is_the_truncated_svd_split_evenly(rows, cols):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4 * cols, cols, generator=gen) * torch.linspace(0.2, 2.0, cols)
    chol = torch.linalg.cholesky(x.t() @ x / x.shape[0])
    weight = torch.randn(rows, cols, generator=gen)
    left, right = _svd_factors(weight, chol, 6)
    u, s, vh = torch.linalg.svd((weight @ chol).double(), full_matrices=False)
    best = (u[:, :6] * s[:6]) @ vh[:6]  # Eckart-Young under the weighted norm
    assert torch.allclose((left @ right @ chol).double(), best, atol=1e-4 * float(s[0]))
    assert torch.allclose(left.norm(dim=0), (right @ chol).norm(dim=1), rtol=1e-4)  # S^1/2 on each side
    assert torch.allclose(left.norm(dim=0).double().square(), s[:6], rtol=1e-4)


@pytest.mark.parametrize("factors, rows, rank", [
    ({"name": "scalar", "bits": 4, "group_size": 16, "clip": True}, 40, 8),
    ({"name": "scalar", "bits": 3, "group_size": 64}, 40, 8), ({"name": "dense", "bits": 16}, 40, 8),
    ({"name": "trellis", "bits": 4, "L": 12, "code": "1mad"}, 48, 16)])  # in 16 x 16 tiles, a scale per row
def test_the_stored_factors_decode_to_exactly_what_was_fitted(factors, rows, rank):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=gen)
    hessian = x.t() @ x / 512
    residual = torch.randn(rows, rank, generator=gen) @ torch.randn(rank, 96, generator=gen)
    low_rank = LowRank(rank, factors)
    stored, product, loss = fit_low_rank(residual, LayerHessian.of(hessian, low_rank.codebook), low_rank, 3)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == low_rank.storage(rows, 96)
    left, right = low_rank.factors(stored, rows, 96)
    assert torch.equal(left @ right, product)
    repacked = low_rank.pack(*low_rank.unpacked(stored, rows, 96))
    assert repacked.keys() == stored.keys() and all(torch.equal(v, stored[k]) for k, v in repacked.items())
    error = residual - product
    assert loss == pytest.approx(float(((error @ hessian) * error).sum()), rel=1e-5)
    assert loss < 0.05 * float(((residual @ hessian) * residual).sum())  # a rank-k matrix, nearly recovered


def test_trellis_factors_have_less_error_than_the_grid_at_fewer_bits():
    """The reason trellis factors are the default: on a rank-16 fit of Gaussian-like factors, 2-bit trellis
    codes (2 bits and an fp16 scale per row) leave less of the residual than the 2-bit grid (2 bits
    plus fp16 scales and 2-bit zeros in groups of 64), and store fewer bits."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1024, 192, generator=gen)
    hessian = x.t() @ x / 1024
    residual = torch.randn(96, 16, generator=gen) @ torch.randn(16, 192, generator=gen) + 0.1 * torch.randn(96, 192, generator=gen)
    results = {}
    for name, factors in (("trellis", {"name": "trellis", "bits": 2, "L": 12, "code": "1mad"}),
                          ("grid", {"name": "scalar", "bits": 2, "group_size": 64, "clip": True})):
        low_rank = LowRank(16, factors)
        stored, _, loss = fit_low_rank(residual, LayerHessian.of(hessian, low_rank.codebook), low_rank, 3)
        results[name] = loss, sum(v.numel() * v.element_size() * 8 for v in stored.values())
    assert results["trellis"][0] < 0.9 * results["grid"][0], results
    assert results["trellis"][1] < results["grid"][1], results


@pytest.mark.parametrize("factors", [{"lr_bits": 4}, {"lr_bits": 2, "lr_format": "grid"}, {"lr_bits": 16}])
def test_a_layer_computes_codes_plus_low_rank_held_or_not(real_layer, factors):
    linear, hessian = real_layer
    layer, _ = _quantize(linear, hessian, "caldera", rank=16, outer_iters=1, **factors)
    assert layer.low_rank.codebook.name == {4: "trellis", 2: "scalar", 16: "dense"}[factors["lr_bits"]]
    left, right = layer.low_rank_factors()
    assert left.shape == (192, 16) and right.shape == (16, 576)
    weight = layer.codebook.dequantize(layer.codebook_tensors(), 192, 576)
    params = layer.transform_params()
    # 3 rows: the fused decode-matvec kernels; 20: decode a tile, then multiply
    for x in (torch.randn(rows, 576, generator=torch.Generator().manual_seed(1)) for rows in (3, 20)):
        streamed = layer(x)
        layer.keep_decoded(True)
        assert torch.allclose(layer(x), streamed, atol=1e-4)
        layer.keep_decoded(False)
        rotated = layer.transform.input(x, params)
        eager = layer.transform.output(rotated @ weight.t() + rotated @ right.t() @ left.t(), params)
        assert torch.allclose(streamed, eager, atol=1e-4)
    if native.available():  # the factors go through their codebook's compiled kernel, not the reference
        for rows, cols, x in ((16, 576, torch.zeros(3, 576)), (192, 16, torch.zeros(20, 16))):
            assert dispatch.select_kernel(x, layer.low_rank.codebook, rows, cols).name.startswith("cpu-")


def test_ranks_and_settings_a_layer_cannot_take_are_refused_in_one_line(real_layer):
    linear, hessian = real_layer
    with pytest.raises(QuipkitError, match=r"rank 200 is larger than a 192x576 weight allows \(at most 192\); lower --rank"):
        _quantize(linear, hessian, "caldera", rank=200)
    with pytest.raises(QuipkitError, match=r"trellis factors need the rank and the weight's sides in multiples of 16: "
                                           r"rank 24 of a 192x576 weight does not fit; use a rank that is a multiple of 16, "
                                           r"or --lr-format grid"):
        _quantize(linear, hessian, "caldera", rank=24)
    for options, message in (({"rank": 0}, "rank >= 1"), ({"outer_iters": 0}, "outer_iters must be"),
                             ({"base": "gptq"}, "base must be"), ({"lr_bits": 12}, "1 to 8 bits"),
                             ({"lr_format": "lattice"}, "lr_format must be 'trellis' or 'grid'"),
                             ({"lr_bits": 16, "lr_format": "trellis"}, "16-bit factors are bf16"),
                             ({"lr_bits": 6, "lr_format": "trellis"}, "trellis factors take 1 to 4 bits"),
                             ({"lr_format": "trellis", "lr_group_size": 32}, "lr_group_size is the grid's")):
        with pytest.raises(QuipkitError, match=message):
            make_config("caldera", 2, **options)


@pytest.mark.parametrize("factors", [{"rank": 16}, {"rank": 8, "lr_format": "grid"}])
def test_a_caldera_model_saves_and_loads_with_identical_logits(tmp_path, factors):
    tokens = _tokens()
    model = tiny_model()
    config = make_config("caldera", 2, outer_iters=2, **factors)
    report = quantize_blockwise(model, tokens, config, CAL, torch.device("cpu"))
    assert all(len(layer["iterations"]) == 2 for layer in report.layers)
    out = quipkit.save(model, None, tmp_path / "q", config, CAL, {"layers": report.layers})
    loaded, _ = quipkit.load(out)
    layers = [m for m in loaded.modules() if isinstance(m, quipkit.QuantizedLinear) and m.codebook.name == "e8p"]
    assert layers and all(m.low_rank is not None and m.low_rank.rank == factors["rank"] for m in layers)
    with torch.no_grad():
        assert torch.equal(loaded(tokens[:2]).logits, model(tokens[:2]).logits)
