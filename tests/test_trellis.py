"""Bitshift trellis codes: Viterbi against brute force, tail-biting closure, decode(encode), packing."""

import itertools

import pytest
import torch

from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.codebooks.trellis import ONE_MAD_INCREMENT, code_values, states_from_chunks, trellis_encode, viterbi_torch
from quipkit.config import make_config
from quipkit.errors import QuipkitError


def _brute_force(x, table, L, k):
    """Best closed walk over every circular bit stream: (cost, states) for each row of x [B, T]."""
    v = table.shape[1]
    kv = k * v
    steps = x.shape[1] // v
    streams = torch.tensor(list(itertools.product(range(1 << kv), repeat=steps)))  # [2^(kv N), N]
    states = states_from_chunks(streams, L, kv)
    values = table[states].reshape(len(streams), -1)  # [W, T]
    costs = torch.cdist(x, values).square()  # [B, W]
    best = costs.min(1)
    return best.values, states[best.indices]


def _free_optimum(x, table, L, k):
    """The unconstrained Viterbi optimum (any start state, no closure): a lower bound."""
    v = table.shape[1]
    seq = x.reshape(x.shape[0], -1, v)
    cost = (seq[:, 0, None] - table[None]).square().sum(-1)
    kv, r = k * v, (1 << L) >> (k * v)
    for step in range(1, seq.shape[1]):
        best = cost.view(len(x), 1 << kv, r).min(1).values
        dist = (seq[:, step, None] - table[None]).square().sum(-1)
        cost = (dist.view(len(x), r, 1 << kv) + best[:, :, None]).view(len(x), -1)
    return cost.min(1).values


def _best_closed_walk(x, table, L, k):
    """The exact best closed walk: the constrained pass for every possible seam, keep the best."""
    from quipkit.codebooks.trellis import _viterbi_pass

    v = table.shape[1]
    kv = k * v
    seams = 1 << (L - kv)
    seq = x.reshape(len(x), -1, v).repeat_interleave(seams, 0)
    fixed = torch.arange(seams).repeat(len(x))
    _, cost = _viterbi_pass(seq, table, L, kv, fixed)
    return cost.view(len(x), seams).min(1).values


@pytest.mark.parametrize("L,k,code", [(5, 1, "1mad"), (6, 2, "lut"), (5, 1, "lut2")])
def test_tail_biting_walks_close_and_seam_search_is_exact_on_tiny_trellises(L, k, code):
    table = code_values(code, L)
    steps = 10 if table.shape[1] == 1 else 4
    x = torch.randn(64, steps * table.shape[1], generator=torch.Generator().manual_seed(L))
    optimum, _ = _brute_force(x, table, L, k)
    assert torch.allclose(_best_closed_walk(x, table, L, k), optimum, rtol=1e-5)  # the oracle below is exact
    states, cost = viterbi_torch(x, table, L, k)
    values = table[states].reshape(len(x), -1)
    assert torch.allclose(cost, (values - x).square().sum(1), rtol=1e-5)  # reports its own walk's cost
    rebuilt = states_from_chunks(states & ((1 << (k * table.shape[1])) - 1), L, k * table.shape[1])
    assert torch.equal(rebuilt, states)  # the walk closes
    assert torch.all(cost >= optimum - 1e-5)
    assert torch.all(_free_optimum(x, table, L, k) <= optimum + 1e-5)


def test_two_pass_tail_biting_is_near_the_best_closed_walk():
    table = code_values("1mad", 10)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    _, cost = trellis_encode(x, table, 10, 2)
    best = _best_closed_walk(x, table, 10, 2)
    assert torch.all(cost >= best - 1e-3)
    assert float((cost - best).sum() / best.sum()) < 0.005  # the approximation costs under 0.5%


@pytest.mark.parametrize("L,k,code", [(5, 1, "1mad"), (6, 2, "lut")])
def test_single_pass_is_the_exact_optimum_over_open_walks(L, k, code):
    from quipkit.codebooks.trellis import _viterbi_pass

    table = code_values(code, L)
    steps, kv = 5, k
    x = torch.randn(32, steps, generator=torch.Generator().manual_seed(7))
    states, cost = _viterbi_pass(x[:, :, None], table, L, kv, None)
    # brute force: any first state, then every sequence of shifted-in chunks
    walks = []
    for first in range(1 << L):
        for chunks in itertools.product(range(1 << kv), repeat=steps - 1):
            walk = [first]
            for b in chunks:
                walk.append(((walk[-1] << kv) & ((1 << L) - 1)) | b)
            walks.append(walk)
    walks = torch.tensor(walks)
    costs = torch.cdist(x, table[walks][..., 0]).square()
    assert torch.allclose(cost, costs.min(1).values, rtol=1e-5, atol=1e-6)
    assert torch.allclose((table[states][..., 0] - x).square().sum(1), cost, rtol=1e-5)


@pytest.mark.parametrize("code,L,k,tiles", [("1mad", 12, 2, 3), ("3inst", 12, 3, 3), ("hyb", 16, 2, 1), ("1mad", 10, 4, 3)])
def test_compiled_viterbi_matches_torch(code, L, k, tiles):
    assert native.available()
    table = code_values(code, L)
    x = torch.randn(tiles, 256, generator=torch.Generator().manual_seed(1))
    states_c, cost_c = trellis_encode(x, table, L, k)
    states_t, cost_t = viterbi_torch(x, table, L, k)
    assert torch.allclose(cost_c, cost_t, rtol=1e-4)
    assert (states_c == states_t).float().mean() > 0.99  # exact ties aside


@pytest.mark.parametrize("spec", [
    {"name": "trellis", "bits": 2, "L": 12, "code": "1mad"},
    {"name": "trellis", "bits": 3, "L": 12, "code": "3inst"},
    {"name": "trellis", "bits": 2, "L": 16, "code": "hyb"},
])
def test_codebook_round_trip(spec):
    cb = make_codebook(spec)
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(2)) * cb.target_rms
    codes, values = cb.quantize(w, cb.fit(w), torch.arange(48))
    assert codes.shape == (2, 3, 256 // cb.values_per_state)
    assert torch.equal(cb.decode(codes, {}), values)
    stored = cb.pack(codes, {})
    for name, (shape, dtype) in cb.storage(32, 48).items():
        assert stored[name].shape == shape and stored[name].dtype == dtype
    assert torch.equal(cb.dequantize(stored, 32, 48), values)
    code_bits = stored["codes"].numel() * 8
    assert code_bits == spec["bits"] * 32 * 48  # exactly k bits per weight
    assert float((values - w).square().mean() / w.square().mean()) < 0.25


def test_one_mad_increment_known_answers():
    """State 0 decodes to the increment's byte sum; a spec without an increment (every checkpoint
    written before it was a parameter) is QTIP's code, and quipkit's qtip method writes its own."""
    def first_value(increment):
        return (sum((increment >> (8 * i)) & 0xFF for i in range(4)) - 510) / 147.800537

    qtip = make_codebook({"name": "trellis", "bits": 2, "L": 12, "code": "1mad"})
    assert qtip.increment == 76625530 and "increment" in qtip.spec()
    assert qtip.table(torch.device("cpu"))[0, 0].item() == pytest.approx(first_value(76625530), abs=1e-6)
    ours = make_codebook(make_config("qtip", 2, L=12).codebook)
    assert ours.increment == ONE_MAD_INCREMENT == 0x04910000
    assert ours.table(torch.device("cpu"))[0, 0].item() == pytest.approx(first_value(0x04910000), abs=1e-6)
    # state 1: a + increment
    assert ours.table(torch.device("cpu"))[1, 0].item() == pytest.approx(first_value((34038481 + 0x04910000) % 2**32), abs=1e-6)
    assert make_codebook(ours.spec()).increment == ONE_MAD_INCREMENT
    with pytest.raises(QuipkitError, match="increment"):
        make_codebook({"name": "trellis", "bits": 2, "code": "3inst", "increment": 5})
    with pytest.raises(QuipkitError, match="increment"):
        make_config("qtip", 2, trellis_code="3inst", increment=5)
    assert make_config("qtip", 2, increment=76625530).codebook["increment"] == 76625530


def test_bad_trellis_parameters_fail_loudly():
    with pytest.raises(QuipkitError, match="unknown trellis code"):
        make_codebook({"name": "trellis", "bits": 2, "code": "5mad"})
    with pytest.raises(QuipkitError, match="L must be 8 to 16"):
        make_codebook({"name": "trellis", "bits": 2, "L": 20})
