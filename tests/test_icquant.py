"""ICQuant's split grid: outliers by magnitude, both grids exact through pack/unpack, the index code
counted in the bits, rounding through the Hessian, and checkpoints that load back."""

from __future__ import annotations

import pytest
import torch

import quipkit
from quipkit.codebooks import make_codebook
from quipkit.config import make_config
from quipkit.errors import QuipkitError
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.layer_group import quantize_group

from conftest import tiny_model
from test_pipeline import CAL, _tokens


def _heavy_tailed(rows=48, cols=320, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * 0.02
    return torch.where(torch.rand(rows, cols, generator=gen) < 0.04, w * 8, w)  # 4% outliers, both signs


def _hessian(cols, seed=1):
    x = torch.randn(4 * cols, cols, generator=torch.Generator().manual_seed(seed)) * torch.linspace(0.3, 2.0, cols)
    return (x.t() @ x / x.shape[0]).double()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_outliers_are_each_rows_largest_and_every_weight_round_trips_through_storage(bits):
    w = _heavy_tailed()
    codebook = make_codebook({"name": "icquant", "bits": bits, "ratio": 0.05})
    params = codebook.fit(w)
    k = round(0.05 * w.shape[1])
    mask = params["mask"]
    assert (mask.sum(1) == k).all()
    smallest_outlier = torch.where(mask, w.abs(), torch.inf).amin(1)
    largest_inlier = torch.where(mask, 0.0, w.abs()).amax(1)
    assert (smallest_outlier >= largest_inlier).all()
    codes, values = codebook.quantize(w, params, torch.arange(w.shape[1]))
    assert torch.equal(codebook.decode(codes, params), values)
    inliers = codebook.inliers.quantize(w, params, torch.arange(w.shape[1]))[1]
    assert torch.equal(values[~mask], inliers[~mask])  # inliers read the inlier grid
    low, step = params["outlier_low"][:, None], params["outlier_step"][:, None]
    levels = ((values.abs() - low) / step).expand_as(w)[mask]
    assert torch.allclose(levels, levels.round(), atol=1e-3) and (values[mask].sign() == w[mask].sign()).all()
    # each outlier on its nearest level: no other level of its row is closer
    grid = low + step * torch.arange(codebook.magnitudes)  # [rows, magnitudes]
    nearest = (w.abs()[:, :, None] - grid[:, None, :]).abs().amin(2)
    assert torch.allclose((values.abs() - w.abs()).abs()[mask], nearest[mask], atol=1e-6)
    stored = codebook.pack(codes, params)
    layer_codebook = make_codebook(codebook.packed_spec(stored))
    assert {name: (tuple(t.shape), t.dtype) for name, t in stored.items()} == layer_codebook.storage(*w.shape)
    back_codes, back_params = layer_codebook.unpack(stored, *w.shape)
    assert torch.equal(back_codes, codes) and torch.equal(back_params["mask"], mask)
    assert torch.equal(layer_codebook.dequantize(stored, *w.shape), values)


@pytest.mark.parametrize("bits", [2, 3])
def test_the_outlier_levels_fit_the_outliers_better_than_their_span(bits):
    w = _heavy_tailed(seed=3)
    importance = torch.linspace(0.2, 3.0, w.shape[1])
    codebook = make_codebook({"name": "icquant", "bits": bits, "ratio": 0.05})
    params = codebook.fit(w, importance)
    mask, magnitude = params["mask"], w.abs()

    def weighted_error(low, step):  # brute force: each outlier to its nearest level of the row
        grid = low[:, None] + step[:, None] * torch.arange(codebook.magnitudes)
        nearest = (magnitude[:, :, None] - grid[:, None, :]).square().amin(2)
        return (torch.where(mask, nearest, 0.0) * importance).sum(1)

    low = torch.where(mask, magnitude, torch.inf).amin(1)
    span = (torch.where(mask, magnitude, 0.0).amax(1) - low) / (codebook.magnitudes - 1)
    fitted = weighted_error(params["outlier_low"], params["outlier_step"])
    spanned = weighted_error(low.half().float(), span.half().float())
    assert (fitted <= spanned * 1.001 + 1e-9).all()  # fp16 storage of both grids
    assert fitted.sum() < 0.7 * spanned.sum()


def test_no_outliers_is_the_plain_grid_and_bad_settings_are_refused_in_one_line():
    w = _heavy_tailed(rows=8, cols=64)
    codebook = make_codebook({"name": "icquant", "bits": 2, "ratio": 0.0})
    params = codebook.fit(w)
    assert not params["mask"].any()
    plain = codebook.inliers.quantize(w, params, torch.arange(64))
    assert torch.equal(codebook.quantize(w, params, torch.arange(64))[1], plain[1])
    for spec, message in (({"bits": 1}, "2 to 8 bits"), ({"bits": 2, "ratio": 1.0}, r"in \[0, 1\)")):
        with pytest.raises(QuipkitError, match=message):
            make_codebook({"name": "icquant", **spec})
    with pytest.raises(QuipkitError, match="index_bytes"):
        make_codebook({"name": "icquant", "bits": 2}).storage(8, 64)


def _round(weight, hessian, method, **options):
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    [(layer, record)] = quantize_group({"l": linear}, hessian.clone(), make_config(method, 2, **options),
                                       torch.device("cpu"))
    x = torch.randn(5, weight.shape[1])
    assert torch.allclose(layer(x), x @ layer.effective_weight().t(), atol=1e-5)
    return layer, record


@pytest.mark.parametrize("group_size", [None, 64])
def test_split_grids_beat_one_grid_at_the_same_code_width_and_the_index_is_counted(group_size):
    w = _heavy_tailed()
    h = _hessian(w.shape[1])
    if group_size is None:  # icquant: one inlier group per row, against GPTQ's grid over the whole row
        _, one = _round(w, h, "gptq", clip=True, group_size=w.shape[1])
        layer, split = _round(w, h, "icquant")
    else:  # GPTQ's grouped grid, with and without the split
        _, one = _round(w, h, "gptq", clip=True, group_size=group_size)
        layer, split = _round(w, h, "gptq", clip=True, group_size=group_size, outlier_ratio=0.05)
        assert layer.scales.shape == (w.shape[0], w.shape[1] // group_size)
    assert split.proxy < 0.75 * one.proxy
    index_bits = layer.positions.numel() * 8 / w.numel()
    assert 0.25 < index_bits < 0.4  # 5% outliers: about 0.3 bits per weight for their positions
    assert split.bits == pytest.approx(layer.stored_bits() / w.numel()) and split.bits > 2 + index_bits
    with pytest.raises(QuipkitError, match="neither incoherence nor symmetric"):
        make_config("gptq", 2, outlier_ratio=0.05, incoherence=True)


def test_an_icquant_model_saves_and_loads_with_identical_logits(tmp_path):
    tokens = _tokens()
    model = tiny_model()
    config = make_config("icquant", 2, outlier_ratio=0.05)
    report = quantize_blockwise(model, tokens, config, CAL, torch.device("cpu"))
    out = quipkit.save(model, None, tmp_path / "q", config, CAL, {"layers": report.layers})
    loaded, _ = quipkit.load(out)
    with torch.no_grad():
        assert torch.equal(loaded(tokens[:2]).logits, model(tokens[:2]).logits)


def test_the_row_table_finds_each_rows_clusters_and_rounds_to_the_nearest_level():
    gen = torch.Generator().manual_seed(3)
    centers = torch.tensor([[-0.3, -0.1, 0.05, 0.4], [-1.0, 0.0, 0.5, 2.0]])
    w = centers.gather(1, torch.randint(0, 4, (2, 400), generator=gen)) + 0.001 * torch.randn(2, 400, generator=gen)
    table = make_codebook({"name": "table", "bits": 2})
    params = table.fit(w)
    assert torch.allclose(params["levels"], centers, atol=0.01)
    x = torch.randn(2, 50, generator=gen)
    codes, values = table.quantize(x, params, torch.arange(50))
    brute = (x[:, :, None] - params["levels"][:, None, :]).abs().argmin(-1)
    assert torch.equal(codes.long(), brute) and torch.equal(values, params["levels"].gather(1, brute))
    stored = table.pack(codes, params)
    assert {k: (tuple(v.shape), v.dtype) for k, v in stored.items()} == table.storage(2, 50)
    assert torch.equal(table.dequantize(stored, 2, 50), values)
    # a column that costs more pulls its level onto itself
    importance = torch.ones(400)
    row = torch.linspace(-1, 1, 400)[None]
    importance[10] = 1e4
    assert (table.fit(row, importance)["levels"] - row[0, 10]).abs().min() < 1e-3
    assert (table.fit(row)["levels"] - row[0, 10]).abs().min() > 0.05


def test_icquant_with_table_inliers_round_trips_and_beats_its_grid():
    # Laplace-like rows, as real weights' are (sharper at zero than a Gaussian: an even grid fits them worse)
    gen = torch.Generator().manual_seed(4)
    u = torch.rand(48, 320, generator=gen) - 0.5
    w = -0.02 * u.sign() * torch.log1p(-2 * u.abs()) * torch.rand(48, 1, generator=gen).add(0.5)
    h = _hessian(w.shape[1])
    _, grid = _round(w, h, "icquant")
    layer, table = _round(w, h, "icquant", inliers="table")
    assert table.proxy < 0.85 * grid.proxy, (table.proxy, grid.proxy)
    assert layer.levels.shape == (w.shape[0], 4) and table.bits == pytest.approx(layer.stored_bits() / w.numel())
    with pytest.raises(QuipkitError, match="has no groups"):
        make_codebook({"name": "icquant", "bits": 2, "inliers": "table", "group_size": 64})


def test_hessian_saliency_picks_what_the_hessian_weighs_and_costs_less_there():
    """Outliers by |w| sqrt(H_jj): each row's top scores (checked row by row), so the columns the Hessian
    weighs heavily hold most outliers; the mask survives storage. (Whether it rounds better is measured on
    the reference model: here, nearest rounding's weighted error rises, as the largest weights then widen
    the inlier grid.)"""
    w = _heavy_tailed(rows=32, cols=320, seed=3)
    h = torch.ones(320)
    h[::10] = 400.0  # every tenth column costs 400x more
    codebook = make_codebook({"name": "icquant", "bits": 2, "ratio": 0.05, "saliency": "hessian"})
    params = codebook.fit(w, h)
    k = round(0.05 * 320)
    score = w.abs() * h.sqrt()
    for row in range(w.shape[0]):
        chosen = set(params["mask"][row].nonzero().flatten().tolist())
        assert chosen == set(score[row].argsort(descending=True)[:k].tolist())
    heavy = torch.zeros(320, dtype=torch.bool)
    heavy[::10] = True
    assert params["mask"][:, heavy].float().mean() > 5 * params["mask"][:, ~heavy].float().mean()
    cols = torch.arange(320)
    stored = codebook.pack(*codebook.quantize(w, params, cols)[:1], params)
    spec = codebook.packed_spec(stored)
    assert spec["saliency"] == "hessian"
    assert torch.equal(make_codebook(spec).unpack(stored, *w.shape)[1]["mask"], params["mask"])
    with pytest.raises(QuipkitError, match="'magnitude' or 'hessian'"):
        make_codebook({"name": "icquant", "bits": 2, "saliency": "size"})
