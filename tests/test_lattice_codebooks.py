"""E8P and RVQ: the codebook as specified, exact nearest search against brute force, decode and packing."""

import pytest
import torch

from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.codebooks.e8p import codeword_table, e8p_nearest, e8p_nearest_torch, source_set
from quipkit.codebooks.rvq import e8_one_bit


def test_source_set_is_as_specified():
    s = source_set()
    norms = s.square().sum(1)
    assert s.shape == (256, 8) and len(torch.unique(s, dim=0)) == 256
    assert int((norms <= 10).sum()) == 227
    extras = s[norms > 10]
    assert len(extras) == 29 and torch.all(extras.square().sum(1) == 12)
    assert torch.all((extras == 1.5).sum(1) == 5) and torch.all((extras == 0.5).sum(1) == 3)
    # every |d| of D8^ with norm^2 <= 10 is there: half-integers only
    assert torch.all(torch.remainder(s * 2, 2) == 1)


def test_codewords_are_the_shifted_d8hat_points():
    table = codeword_table()
    assert table.shape == (65536, 8) and len(torch.unique(table, dim=0)) == 65536
    for shift, half in ((-0.25, slice(0, 32768)), (0.25, slice(32768, 65536))):
        d = table[half] - shift
        assert torch.all(torch.remainder(d * 2, 2) == 1)  # half-integers
        assert torch.all(torch.remainder(d.sum(1), 2) == 0)  # even sum: D8^
        abs_sorted = d.abs()
        keys = {tuple(r) for r in source_set().tolist()}
        assert all(tuple(r) in keys for r in abs_sorted[:: 997].tolist())


def _brute_force(x, table, chunk=2000):
    return torch.cat([torch.cdist(part, table).min(1).values for part in x.split(chunk)]).square()


@pytest.mark.parametrize("search", ["default", "torch"])
def test_nearest_search_agrees_with_brute_force(search):
    table = codeword_table()
    gen = torch.Generator().manual_seed(11)
    count = 100_000 if search == "default" else 20_000
    # a mix of scales: small vectors hit the lattice decoder, large ones the pattern scan
    x = torch.randn(count, 8, generator=gen) * torch.tensor([0.3, 1.0, 1.5, 3.0]).repeat_interleave(count // 4)[:, None]
    codes, values = (e8p_nearest if search == "default" else e8p_nearest_torch)(x)
    assert torch.equal(table[codes.long()], values)
    mine = (x - values).square().sum(1)
    best = _brute_force(x, table)
    assert torch.allclose(mine, best, rtol=1e-5, atol=1e-5)


def test_compiled_search_is_built_and_matches_torch():
    assert native.available(), "the C extension should be built by the package install"
    x = torch.randn(30_000, 8, generator=torch.Generator().manual_seed(3)) * 1.5
    assert torch.equal(e8p_nearest(x)[0], e8p_nearest_torch(x)[0])


def test_one_bit_e8_codebook():
    p = e8_one_bit()
    norms = p.square().sum(1)
    assert p.shape == (256, 8) and len(torch.unique(p, dim=0)) == 256
    assert int((norms <= 2).sum()) == 241 and int((norms == 4).sum()) == 15
    # all points are in E8 = D8 ∪ (D8 + 1/2): integer or half-integer coordinates, even sum
    assert torch.all(torch.remainder(p.sum(1), 2) == 0)


# Loose bounds on 2^18 samples (sampling noise is ~0.5%); bench/distortion.py measures the targets
# (0.0915 / 0.0290 / 0.0085) on 2^20 samples and more.
@pytest.mark.parametrize("spec,mse_bound", [
    ({"name": "e8p", "bits": 2}, 0.0925),
    ({"name": "rvq", "bits": 3}, 0.0310),
    ({"name": "rvq", "bits": 4}, 0.0090),
])
def test_gaussian_distortion_round_trip_and_packing(spec, mse_bound):
    cb = make_codebook(spec)
    x = torch.randn(1 << 15, 8, generator=torch.Generator().manual_seed(1))
    block = (x * cb.target_rms).reshape(-1, 64)
    codes, values = cb.quantize(block, {}, torch.arange(64))
    assert float((values / cb.target_rms - x.reshape(-1, 64)).square().mean()) < mse_bound
    assert torch.equal(cb.decode(codes, {}), values)
    stored = cb.pack(codes, {})
    for name, (shape, dtype) in cb.storage(*block.shape).items():
        assert stored[name].shape == shape and stored[name].dtype == dtype
    assert torch.equal(cb.dequantize(stored, *block.shape), values)
    bits = sum(t.numel() * t.element_size() * 8 for t in stored.values()) / block.numel()
    assert bits == spec["bits"]
