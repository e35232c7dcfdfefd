"""LDLQ, GPTQ, greedy refinement and the proxy loss, against straightforward reference code."""

import sys

import torch

from quipkit.codebooks import make_codebook
from quipkit.rounding import greedy_refine, ldl_feedback, ldlq, prepare_hessian, proxy_loss, round_nearest


def _random_problem(m=32, n=96, seed=0, tokens=400):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen)
    # correlated inputs, like activations: x = z A
    x = torch.randn(tokens, n, generator=gen) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen))
    h = prepare_hessian((x.t() @ x).double() / tokens, 0.01)
    return w, h


def gptq_column_loop(w, h, codebook, params, order=None):
    """GPTQ as published (Frantar et al. 2023): columns in order, error spread with chol(H^-1)."""
    n = w.shape[1]
    order = torch.arange(n) if order is None else order
    w = w[:, order].clone().double()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h[order][:, order])), upper=True)
    q_all = torch.zeros_like(w)
    for j in range(n):
        _, q = codebook.quantize(w[:, j : j + 1].float(), params, order[j : j + 1])
        q_all[:, j] = q[:, 0].double()
        err = (w[:, j] - q_all[:, j]) / hinv[j, j]
        w[:, j + 1 :] -= err[:, None] * hinv[j, j + 1 :][None, :]
    out = torch.empty_like(q_all)
    out[:, order] = q_all
    return out.float()


def test_ldlq_g1_equals_gptq_loop():
    w, h = _random_problem()
    cb = make_codebook({"name": "scalar", "bits": 3, "group_size": 32})
    params = cb.fit(w)
    _, values = ldlq(w, h, cb, params, lazy_batch=40)
    expected = gptq_column_loop(w, h, cb, params)
    assert torch.allclose(values, expected, atol=1e-5)


def test_ldlq_act_order_equals_gptq_loop_on_permuted_columns():
    w, h = _random_problem(seed=1)
    cb = make_codebook({"name": "scalar", "bits": 2, "group_size": 32})
    params = cb.fit(w)
    order = torch.argsort(torch.diagonal(h), descending=True)
    codes, values = ldlq(w, h, cb, params, order=order)
    assert torch.allclose(values, gptq_column_loop(w, h, cb, params, order), atol=1e-5)
    assert torch.equal(cb.decode(codes, params), values)


def test_feedback_matrix_is_block_ldl():
    _, h = _random_problem(n=48)
    for g in (1, 8, 16):
        a = ldl_feedback(h, g).double()
        # A = M^-1 with H = M D M^T: M unit block-upper-triangular, D block diagonal
        m = torch.linalg.inv(a)
        blocks = torch.arange(48) // g
        below = blocks[:, None] > blocks[None, :]
        assert torch.allclose(m[below], torch.zeros_like(m[below]), atol=1e-5)
        same = blocks[:, None] == blocks[None, :]
        assert torch.allclose(m[same], torch.eye(48, dtype=m.dtype)[same], atol=1e-5)
        d = torch.linalg.inv(m) @ h @ torch.linalg.inv(m).t()
        assert torch.allclose(d[~same], torch.zeros_like(d[~same]), atol=1e-4)


def test_the_feedback_matrix_solved_in_bands_has_the_same_bits(monkeypatch):
    import sys

    module = sys.modules["quipkit.rounding.ldlq"]

    _, h = _random_problem(n=48)
    for g in (1, 8, 16):
        whole = ldl_feedback(h, g)
        monkeypatch.setattr(module, "SOLVE_BYTES", g * 48 * 4 * 2)  # two block rows a band: several bands
        assert torch.equal(ldl_feedback(h, g), whole) and whole.is_contiguous()
        monkeypatch.undo()


def test_ldlq_proxy_is_sum_of_blockwise_errors_and_beats_nearest():
    wins = 0
    for seed in range(6):
        w, h = _random_problem(seed=seed)
        cb = make_codebook({"name": "uniform", "bits": 2})
        scaled = w / w.square().mean().sqrt()
        _, q_ldlq = ldlq(scaled, h, cb, {})
        _, q_near = round_nearest(scaled, cb, {})
        wins += proxy_loss(scaled, q_ldlq, h) < proxy_loss(scaled, q_near, h)
    assert wins == 6


def test_greedy_never_increases_the_proxy():
    w, h = _random_problem(seed=3)
    cb = make_codebook({"name": "uniform", "bits": 2})
    scaled = w / w.square().mean().sqrt()
    codes, values = ldlq(scaled, h, cb, {})
    before = proxy_loss(scaled, values, h)
    codes2, values2, kept = greedy_refine(scaled, h, cb, {}, codes, values, sweeps=5, lazy_batch=32)
    after = proxy_loss(scaled, values2, h)
    assert after <= before
    assert kept >= 1 and after < before
    assert torch.equal(cb.decode(codes2, {}), values2)


def test_prepare_hessian_normalises_damps_and_fixes_dead_inputs():
    h = torch.diag(torch.tensor([2.0, 4.0, 0.0], dtype=torch.float64))
    out = prepare_hessian(h, 0.01)
    assert torch.allclose(torch.diagonal(out), torch.tensor([1.01, 2.01, 1.01], dtype=torch.float64))


def test_rounding_by_blocks_of_rows_gives_the_same_result(monkeypatch):
    """LDLQ and greedy round a few rows at a time (bounded memory); rows are independent, so the
    result is the same as rounding the whole matrix at once, bit for bit."""
    ldlq_module = sys.modules["quipkit.rounding.ldlq"]
    torch.manual_seed(3)
    x = torch.randn(256, 64)
    h = (x.t() @ x / 256).double() + 0.01 * torch.eye(64, dtype=torch.float64)
    order = torch.argsort(torch.diagonal(h), descending=True)
    for spec, act_order in (({"name": "e8p", "bits": 2}, False), ({"name": "scalar", "bits": 3, "group_size": 16}, True)):
        cb = make_codebook(spec)
        w = torch.randn(70, 64)
        params = cb.fit(w)

        def run():
            codes, values = ldlq(w, h, cb, params, order if act_order else None)
            return (codes, values, *greedy_refine(w, h, cb, params, codes.clone(), values.clone(), 3))

        whole = run()
        monkeypatch.setattr(ldlq_module, "ROW_BYTES", 16 * 64 * 4)  # 16 rows a step: 5 blocks, a short last one
        assert len(ldlq_module.row_blocks(cb, 70, 64)) == 5
        blocks = run()
        monkeypatch.undo()
        assert whole[4] == blocks[4] > 0
        assert all(torch.equal(a, b) for a, b in zip(whole[:4], blocks[:4]))


def test_a_sweep_that_does_not_help_is_undone_exactly():
    """The sweep that stops the refinement leaves codes and values as they were before it (restored by
    decoding the kept codes, not from a float copy)."""
    w, h = _random_problem(seed=5)
    cb = make_codebook({"name": "uniform", "bits": 2})
    scaled = w / w.square().mean().sqrt()
    codes, values = ldlq(scaled, h, cb, {})
    kept = greedy_refine(scaled, h, cb, {}, codes.clone(), values.clone(), sweeps=100)[2]
    assert 0 < kept < 100  # a sweep that did not help ended it
    stopped = greedy_refine(scaled, h, cb, {}, codes.clone(), values.clone(), sweeps=kept + 1)
    exact = greedy_refine(scaled, h, cb, {}, codes.clone(), values.clone(), sweeps=kept)
    assert stopped[2] == exact[2] == kept
    assert torch.equal(stopped[0], exact[0]) and torch.equal(stopped[1], exact[1])


def test_a_consumed_hessian_is_released_once_the_rounding_holds_it_in_float32():
    from quipkit.config import make_config
    from quipkit.pipeline.layer_group import quantize_group

    torch.manual_seed(0)
    x = torch.randn(512, 64)
    for method, bits in (("quip#", 2), ("gptq", 4)):  # transformed, and rounded as it is
        linears = {"a": torch.nn.Linear(64, 32, bias=False)}
        hessian = (x.t() @ x / 512).double()
        kept = hessian.clone()
        cfg = make_config(method, bits, group_size=32) if method == "gptq" else make_config(method, bits)
        quantize_group(linears, kept, cfg, torch.device("cpu"))
        assert torch.equal(kept, hessian)  # not consumed: untouched
        quantize_group(linears, hessian, cfg, torch.device("cpu"), consume=True)
        assert hessian.numel() == 0
