"""QuIP's theory on random instances: LDLQ vs nearest rounding, the proxy-loss bound, incoherence."""

import math

import torch

from quipkit.codebooks.scalar import UniformGrid
from quipkit.config import make_config
from quipkit.eval.incoherence import hessian_incoherence, layer_incoherence, ldlq_bound, weight_incoherence
from quipkit.rounding import ldlq, prepare_hessian, proxy_loss, round_nearest
from quipkit.transforms import make_transform


class StochasticGrid(UniformGrid):
    """Unbiased stochastic rounding on a uniform grid: the rounding QuIP's bound is stated for."""

    def __init__(self, bits, range, gen):
        super().__init__(bits, range)
        self.gen = gen

    def quantize(self, block, params, cols):
        pos = (block + self.range) / self.step
        low = torch.floor(pos)
        up = torch.rand(pos.shape, generator=self.gen) < (pos - low)
        codes = torch.clamp(low + up, 0, self.qmax)
        return codes.to(torch.int32), codes * self.step - self.range


def _problem(m, n, seed, spike=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=gen, dtype=torch.float64)
    if spike:  # an outlier weight and an axis-aligned input direction: incoherent processing should help
        w[0, 0] = 25.0
    x = torch.randn(2000, n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    x[:, 0] *= 10
    return w, prepare_hessian(x.t() @ x / 2000, 0.01)


def _kronecker(w, h, seed=0):
    t = make_transform({"name": "kronecker", "rescale": False})
    params = {**t.fit_input(h, [w], seed), **t.fit_output(w.shape[0], seed + 1)}
    return t.weight(w, params), t.hessian(h, params)


def test_incoherence_processing_lowers_mu_of_weights_and_hessian():
    w, h = _problem(64, 96, 0, spike=True)
    w_t, h_t = _kronecker(w, h)
    assert weight_incoherence(w_t) < weight_incoherence(w) / 2
    assert hessian_incoherence(h_t) < hessian_incoherence(h) / 2
    report = layer_incoherence(w.float(), h, seed=3)
    for label in ("rht", "kronecker"):
        assert report[label]["mu_w"] < report["none"]["mu_w"] and report[label]["mu_h"] < report["none"]["mu_h"]
        assert report[label]["bound"] < report["none"]["bound"]


def test_ldlq_beats_nearest_in_expectation_under_incoherence():
    wins, ldlq_total, nearest_total = 0, 0.0, 0.0
    for seed in range(8):
        w, h = _problem(48, 64, seed)
        w_t, h_t = _kronecker(w, h, seed)
        scaled = (w_t / w_t.square().mean().sqrt()).float()
        cb = UniformGrid(2)
        _, q_ldlq = ldlq(scaled, h_t, cb, {})
        _, q_near = round_nearest(scaled, cb, {})
        a, b = proxy_loss(scaled, q_ldlq, h_t), proxy_loss(scaled, q_near, h_t)
        ldlq_total, nearest_total, wins = ldlq_total + a, nearest_total + b, wins + (a <= b)
    assert wins == 8 and ldlq_total < 0.8 * nearest_total


def test_measured_proxy_stays_under_the_paper_bound():
    gen = torch.Generator().manual_seed(0)
    for seed in range(3):
        w, h = _problem(32, 48, seed, spike=True)
        for processed in (False, True):
            w_t, h_t = _kronecker(w, h, seed) if processed else (w, h)
            grid_range = float(w_t.abs().max()) * 1.01  # no clipping: stochastic rounding stays unbiased
            cb = StochasticGrid(3, grid_range, gen)
            trials = [proxy_loss(w_t.float(), ldlq(w_t.float(), h_t, cb, {})[1], h_t) for _ in range(20)]
            measured = sum(trials) / len(trials)
            sigma2 = cb.step**2 / 4  # the variance of stochastic rounding is at most step^2 / 4
            bound = ldlq_bound(h_t, w.shape[0], hessian_incoherence(h_t), sigma2)
            assert measured <= bound
    # and incoherence tightens it: the processed bound is smaller for the spiky problem
    w, h = _problem(32, 48, 9, spike=True)
    w_t, h_t = _kronecker(w, h)
    assert hessian_incoherence(h_t) < hessian_incoherence(h)


def test_quip_and_incoherent_gptq_presets():
    quip = make_config("quip", 2)
    assert quip.transform == {"name": "kronecker", "rescale": True} and quip.codebook["name"] == "uniform"
    assert quip.rounding == "ldlq" and quip.greedy_sweeps > 0
    assert make_config("quip", 2, order="rg").act_order
    gptq = make_config("gptq", 3, incoherence=True)
    assert gptq.transform["name"] == "kronecker" and gptq.codebook["name"] == "scalar"
    assert math.isclose(quip.damping, 0.01)
