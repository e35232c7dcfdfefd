"""Hadamard constructions, fast transforms, RHT and QuIP's Kronecker transform."""

import pytest
import torch

from quipkit.transforms import make_transform
from quipkit.transforms.hadamard import (
    dct,
    fwht,
    hadamard_factor,
    hadamard_matrix,
    has_hadamard,
    orthogonal_op,
)

REAL_DIMS = [576, 1536, 192, 640, 2048, 4096, 5120, 11008, 13824, 14336, 28672, 10920, 18944]


@pytest.mark.parametrize("order", [1, 2, 4, 12, 20, 28, 36, 40, 44, 52, 60, 68, 76, 100, 108, 148, 244, 344])
def test_hadamard_matrices_are_hadamard(order):
    h = hadamard_matrix(order).double()
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), order * torch.eye(order, dtype=h.dtype))


def test_constructions_cover_paley_orders_including_prime_powers():
    # 28 = 27 + 1 (GF(3^3)), 52 = 2(25 + 1) (GF(5^2)), 344 = 343 + 1 (GF(7^3)), 148 = 2(73 + 1)
    for order in (28, 52, 344, 148, 36, 12):
        assert has_hadamard(order)
    assert not has_hadamard(6) and not has_hadamard(10)


@pytest.mark.parametrize("n", [1, 2, 64, 128, 1024, 4096])
def test_fwht_matches_sylvester_matrix(n):
    x = torch.randn(5, n, dtype=torch.float64)
    sylvester = torch.tensor([[1.0]], dtype=torch.float64)
    while sylvester.shape[0] < n:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)])
    assert torch.allclose(fwht(x), x @ sylvester.t())


@pytest.mark.parametrize("n", REAL_DIMS)
def test_real_dims_have_fast_orthogonal_transform(n):
    op = orthogonal_op(n)
    x = torch.randn(3, n, dtype=torch.float64)
    y = op.apply(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))  # orthogonal
    assert torch.allclose(op.apply(y, transpose=True), x, atol=1e-10)  # inverse
    if n in (10920,):
        assert op.kind == "dct"  # 10920 = 8 * 1365 has no Hadamard factor
    else:
        assert op.kind == "hadamard" and n % op.factor == 0


@pytest.mark.parametrize("n", [12, 36, 40, 96, 100, 7, 30])
def test_fast_equals_dense_and_dense_is_orthogonal(n):
    op = orthogonal_op(n)
    dense = op.dense()
    assert torch.allclose(dense @ dense.t(), torch.eye(n, dtype=dense.dtype), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(op.apply(x), x @ dense.t(), atol=1e-12)
    assert torch.allclose(op.apply(x, transpose=True), x @ dense, atol=1e-12)
    if op.kind == "hadamard":
        k = op.factor
        expected = torch.kron(hadamard_matrix(k).double(), orthogonal_op(n // k).dense() * (n // k) ** 0.5) / n**0.5
        assert torch.allclose(dense, expected, atol=1e-12)


def test_dct_is_the_orthonormal_dct2():
    n = 9
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(torch.pi * (2 * i + 1) * k / (2 * n)) * (2 / n) ** 0.5
    c[0] /= 2**0.5
    x = torch.randn(2, n, dtype=torch.float64)
    assert torch.allclose(dct(x), x @ c.t())
    assert torch.allclose(dct(x, inverse=True), x @ c)


def test_hadamard_factor_prefers_smallest():
    assert hadamard_factor(576) == 36 and hadamard_factor(1536) == 12 and hadamard_factor(4096) == 1
    assert hadamard_factor(10920) is None


@pytest.mark.parametrize("spec", [{"name": "rht"}, {"name": "kronecker", "rescale": True}, {"name": "kronecker", "rescale": False}])
@pytest.mark.parametrize("shape", [(48, 40), (36, 7)])
def test_transform_is_exact_conjugation(spec, shape):
    m, n = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    x = torch.randn(10, n, generator=gen, dtype=torch.float64)
    h = x.t() @ x / 10 + torch.eye(n, dtype=torch.float64)
    t = make_transform(spec)
    params = {**t.fit_input(h, [w], 1), **t.fit_output(m, 2)}
    params = {k: (v.double() if v.is_floating_point() else v) for k, v in params.items()}
    w_t, h_t = t.weight(w, params), t.hessian(h, params)
    # the online path reproduces the layer: output(W~ input(x)) = W x
    assert torch.allclose(t.output(t.input(x, params) @ w_t.t(), params), x @ w.t(), atol=1e-10)
    # the proxy loss is invariant: tr(E~ H~ E~^T) = tr(E H E^T) for E~ = transform of E
    e = torch.randn(m, n, generator=gen, dtype=torch.float64)
    e_t = t.weight(e, params)
    assert torch.allclose(((e_t @ h_t) * e_t).sum(), ((e @ h) * e).sum())
    # incoherence: the rotated weight's largest entry shrinks for a spiky W
    spiky = torch.zeros(m, n, dtype=torch.float64)
    spiky[0, 0] = 1.0
    assert t.weight(spiky, params).abs().max() < 0.5


def test_kronecker_regenerates_identically_from_seed():
    t = make_transform({"name": "kronecker", "rescale": False})
    w = torch.randn(20, 30)
    h = torch.eye(30)
    a = t.weight(w, {**t.fit_input(h, [w], 5), **t.fit_output(20, 6)})
    from quipkit.transforms.kronecker import KroneckerOp

    fresh = KroneckerOp(30, 5)
    assert torch.allclose(fresh.apply(w), a.new_tensor(0) + KroneckerOp(30, 5).apply(w))
    assert torch.allclose(t.weight(w, {**t.fit_input(h, [w], 5), **t.fit_output(20, 6)}), a)


def test_large_rotations_go_by_blocks_of_rows_with_the_same_bits(monkeypatch):
    from quipkit.transforms import rht
    from quipkit.transforms.hadamard import orthogonal_op

    gen = torch.Generator().manual_seed(0)
    for n in (576, 1536, 960):  # Hadamard factors 36, 12, 60
        matrix = torch.randn(300, n, generator=gen, dtype=torch.float64)
        signs = rht.random_signs(n, 1)
        whole = orthogonal_op(n).apply(matrix * signs.to(matrix), transpose=True)
        monkeypatch.setattr(rht, "ROTATE_STEP", 7 * n)  # blocks of 7 rows, the last one short
        assert torch.equal(rht.rotate_rows(matrix, signs), whole)
        assert torch.equal(rht.rotate_rows(matrix.t().contiguous().t(), signs), whole)  # a transposed view too
        in_place = matrix.clone()
        assert rht.rotate_rows(in_place, signs, out=in_place) is in_place and torch.equal(in_place, whole)
        monkeypatch.undo()


def test_a_consumed_hessian_is_rotated_in_its_own_memory_to_the_same_bits(monkeypatch):
    from quipkit.transforms import rht

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(700, 576, generator=gen, dtype=torch.float64)
    hessian = x.t() @ x / 700
    transform = rht.RandomHadamard()
    params = transform.fit_input(hessian, [], 3)
    for step in (rht.ROTATE_STEP, 7 * 576):  # whole, then blocks of 7 rows (the last one short)
        monkeypatch.setattr(rht, "ROTATE_STEP", step)
        kept = hessian.clone()
        fresh = transform.hessian(kept, params)
        consumed = hessian.clone()
        pointer = consumed.data_ptr()
        result = transform.hessian(consumed, params, consume=True)
        assert torch.equal(kept, hessian)  # not consumed: untouched
        assert torch.equal(result, fresh) and result.data_ptr() == pointer  # same bits, no second matrix
        monkeypatch.undo()
