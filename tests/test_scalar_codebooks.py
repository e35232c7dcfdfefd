import pytest
import torch

from quipkit.codebooks import make_codebook
from quipkit.codebooks.scalar import GroupGrid
from quipkit.errors import QuipkitError


def _fit_round(spec, w):
    cb = make_codebook(spec)
    params = cb.fit(w)
    codes, values = cb.quantize(w, params, torch.arange(w.shape[1]))
    return cb, params, codes, values


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_group_grid_error_bound_and_decode(bits, symmetric):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(bits))
    cb, params, codes, values = _fit_round({"name": "scalar", "bits": bits, "group_size": 64, "symmetric": symmetric}, w)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    # the grid spans each group (up to the zero point's and the fp16 scale's rounding at the ends),
    # so no error exceeds a step and the typical error is a quarter step
    step = params["scale"][:, torch.arange(200) // 64]
    err = (w - values).abs() / step
    assert err.max() <= 1.0 + 1e-4
    assert err.mean() < 0.3
    assert torch.equal(cb.decode(codes, params), values)
    stored = cb.pack(codes, params)
    for name, (shape, dtype) in cb.storage(24, 200).items():
        assert stored[name].shape == shape and stored[name].dtype == dtype
    assert torch.equal(cb.dequantize(stored, 24, 200), values)


def test_group_grid_asymmetric_includes_zero_and_extremes():
    w = torch.tensor([[0.5, 1.0, 2.0, 3.0]])
    cb, params, codes, values = _fit_round({"name": "scalar", "bits": 2, "group_size": 4}, w)
    # range [0, 3] in 3 steps of 1.0: 0.5 rounds to 0 or 1; 1, 2, 3 are exact
    assert params["scale"].item() == 1.0 and params["zero"].item() == 0
    assert values[0, 1:].tolist() == [1.0, 2.0, 3.0]


def test_uniform_grid_levels():
    cb = make_codebook({"name": "uniform", "bits": 2, "range": 1.5})
    x = torch.tensor([[-9.0, -0.6, 0.4, 0.51, 9.0]])
    _, values = cb.quantize(x, {}, torch.arange(5))
    assert values.tolist() == [[-1.5, -0.5, 0.5, 0.5, 1.5]]


def test_bad_codebook_specs_fail_loudly():
    with pytest.raises(QuipkitError, match="unknown codebook"):
        make_codebook({"name": "nope", "bits": 2})
    with pytest.raises(QuipkitError, match="bad parameters"):
        make_codebook({"name": "scalar", "bits": 4, "gruop_size": 64})
    with pytest.raises(QuipkitError, match="1 to 8 bits"):
        make_codebook({"name": "scalar", "bits": 9})


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipped_grid_never_loses_to_min_max_and_halves_2bit_gaussian_error(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    cols = torch.arange(256)
    errors = {}
    for clip in (False, True):
        cb = GroupGrid(bits, 128, clip=clip)
        _, values = cb.quantize(w, cb.fit(w), cols)
        errors[clip] = (values - w).square().reshape(64, 2, 128).sum(-1)  # per row and group
    assert (errors[True] <= errors[False] + 1e-5).all()  # the min-max range is one of the candidates
    if bits == 2:  # Gaussian 2-bit: min-max spends levels on the tails; the clipped range ~halves the MSE
        assert errors[True].sum() < 0.6 * errors[False].sum()
