"""Quantize the linears that read one input: transform, normalise, round together, split, build layers.

Layers that share an input (q/k/v, gate/up) share its Hessian, so they share the input side of the
transform and are rounded as one stacked matrix: rounding is independent per row, so stacking
changes nothing but the number of passes. Each layer keeps its own output transform and scale.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from quipkit.codebooks import make_codebook
from quipkit.codebooks.base import split_rows
from quipkit.codebooks.low_rank import LowRank
from quipkit.config import QuantConfig
from quipkit.errors import QuipkitError
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.pipeline.guards import check_finite, definite_hessian, proxy_warning
from quipkit.rounding import Problem, relative_proxy_loss, solve
from quipkit.transforms import make_transform


@dataclass
class LayerRecord:
    """What happened to one layer: the numbers the CLI shows and the checkpoint keeps."""

    name: str
    shape: tuple[int, int]
    proxy: float  # relative proxy loss tr(E H E^T) / tr(W H W^T) under the damped Hessian
    bits: float  # bits per weight as stored (codes, scales, sign vectors)
    seconds: float
    greedy_sweeps: int
    damping: float = 0.0  # the damping that made its Hessian positive definite (more than asked: recorded)
    dead_inputs: int = 0  # input columns no calibration token excited
    warnings: tuple[str, ...] = ()
    iterations: tuple[float, ...] = ()  # an iterative solver's (CALDERA's) relative proxy after each outer iteration

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "proxy": self.proxy,
            "bits": self.bits,
            "seconds": self.seconds,
            "greedy_sweeps": self.greedy_sweeps,
            "damping": self.damping,
            "dead_inputs": self.dead_inputs,
            "warnings": list(self.warnings),
            "iterations": list(self.iterations),
        }


def stable_seed(seed: int, name: str) -> int:
    """A seed for `name` that is the same on every machine and Python run."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def _rms(matrix: Tensor) -> float:
    return float(matrix.double().square().mean().sqrt().clamp_min(1e-12))


def quantize_group(
    linears: dict[str, nn.Linear], hessian: Tensor | None, config: QuantConfig, device: torch.device,
    consume: bool = False,
) -> list[tuple[QuantizedLinear, LayerRecord]]:
    """Quantize `linears` (all reading an input with second moment `hessian` [n, n]; None: uncalibrated,
    H = I) under `config`; with `consume`, `hessian`'s memory is reused or released (its values are lost)."""
    by_config: dict[str, tuple[QuantConfig, list[str]]] = {}
    for name in linears:
        cfg = config.for_layer(name)
        by_config.setdefault(cfg.to_json(), (cfg, []))[1].append(name)
    results = []
    for cfg, names in by_config.values():
        results.extend(_quantize_stack({n: linears[n] for n in names}, hessian, cfg, device,
                                       consume and len(by_config) == 1))
    order = list(linears)
    return sorted(results, key=lambda pair: order.index(pair[1].name))


def _quantize_stack(
    linears: dict[str, nn.Linear], hessian: Tensor | None, cfg: QuantConfig, device: torch.device, consume: bool = False
) -> list[tuple[QuantizedLinear, LayerRecord]]:
    start = time.perf_counter()
    names = list(linears)
    codebook = make_codebook(cfg.codebook).for_columns(linears[names[0]].in_features)
    transform = make_transform(cfg.transform)
    if codebook.target_rms is not None and not transform.scaled:
        raise QuipkitError(f"codebook '{codebook.name}' needs a transform (rht or kronecker), not identity")
    weights = [linears[n].weight.detach().to(device, torch.float32) for n in names]
    low_rank = LowRank(cfg.low_rank["rank"], cfg.low_rank["codebook"]) if cfg.low_rank else None
    for name, w in zip(names, weights):
        try:
            codebook.check_shape(*w.shape)
            if low_rank is not None:
                low_rank.check_shape(*w.shape)
        except QuipkitError as err:
            raise QuipkitError(f"{name}: {err}") from None
        check_finite(w, f"the weight of {name}", "the float model is corrupt; restore its files")
    if hessian is None and cfg.rounding == "nearest" and transform.spec()["name"] == "identity":
        h_t, damping, dead, in_params = None, cfg.damping, 0, {}  # H = I is never built (1 GB for a 7B MLP's)
    else:
        if hessian is None:
            hessian = torch.eye(weights[0].shape[1], dtype=torch.float64)
        if hessian.dim() == 3:  # guided: one Hessian per group of output rows, each prepared alike
            prepared = [definite_hessian(part.to(device), cfg.damping, names) for part in hessian]
            h = torch.stack([part for part, _, _ in prepared])
            damping, dead = max(d for _, d, _ in prepared), max(n for _, _, n in prepared)
            in_params = transform.fit_input(h.mean(0), weights, stable_seed(cfg.seed, names[0] + ":in"))
            h_t = torch.stack([transform.hessian(part, in_params) for part in h])
        else:
            h, damping, dead = definite_hessian(hessian.to(device), cfg.damping, names, consume)
            in_params = transform.fit_input(h, weights, stable_seed(cfg.seed, names[0] + ":in"))
            # the caller's Hessian, once transformed, goes now rather than after the rounding
            h_t = transform.hessian(h, in_params, consume=consume)
    out_params, scales = [], []
    sizes = [w.shape[0] for w in weights]
    # the stack is written in place, one layer's transformed copy at a time (a lone layer: no stack)
    target = None if len(weights) == 1 else torch.empty(sum(sizes), weights[0].shape[1], device=device)
    row = 0
    for name, w in zip(names, weights):
        params = {**in_params, **transform.fit_output(w.shape[0], stable_seed(cfg.seed, name + ":out"))}
        w_t = transform.weight(w, params)
        scale = _rms(w_t) / codebook.target_rms if codebook.target_rms is not None else 1.0
        if codebook.target_rms is not None:
            w_t = w_t.div_(scale) if w_t is not w else w_t / scale
        out_params.append(params)
        scales.append(scale)
        if target is None:
            target = w_t  # a lone layer rounds its transformed copy, or (untransformed) reads its own weight
        else:
            target[row : row + w.shape[0]] = w_t
            row += w.shape[0]
        del w_t
    diagonal = None if h_t is None else torch.diagonal(h_t, dim1=-2, dim2=-1)
    diagonal = diagonal.mean(0) if diagonal is not None and diagonal.dim() == 2 else diagonal  # guided: the groups' mean
    cb_params = codebook.fit(target, diagonal)
    order = torch.argsort(diagonal, descending=True) if cfg.act_order and h_t is not None else None
    if h_t is not None:
        # from here on H is read in float32 (LDLQ factors it so first, greedy and the proxy record multiply
        # in it): half the memory for the rounding's widest matrix (a 7B MLP's is 0.5 GB instead of 1)
        h_single = h_t.float()
        for held in (h, h_t):  # the float64 H, transformed or not: this function's copy, or the caller's to consume
            held.set_()
        h_t = h_single
    solution = solve(cfg.rounding, Problem(target, h_t, codebook, cb_params, order, sizes, cfg.greedy_sweeps,
                                           dict(cfg.low_rank or {})))
    code_parts = split_rows({"codes": solution.codes}, sizes, codebook.row_block)
    param_parts = split_rows(solution.params, sizes, 1)
    value_parts = torch.split(solution.values, sizes)
    target_parts = torch.split(target, sizes)
    elapsed = (time.perf_counter() - start) / len(names)
    results = []
    for i, name in enumerate(names):
        linear = linears[name]
        scale = scales[i] * (solution.scales[i] if solution.scales else 1.0)
        params = transform.fold_scale(out_params[i], scale) if transform.scaled else out_params[i]
        tensors = {**codebook.pack(code_parts[i]["codes"], param_parts[i]), **params}
        spec = {
            "in_features": linear.in_features,
            "out_features": linear.out_features,
            "codebook": codebook.packed_spec(tensors),
            "transform": transform.spec(),
            "bias": linear.bias is not None,
        }
        if solution.low_rank:
            tensors.update(solution.low_rank[i])
            spec["low_rank"] = low_rank.spec()
        layer = QuantizedLinear.from_tensors(spec, {k: v.cpu() for k, v in tensors.items()}, linear.bias)
        proxy = relative_proxy_loss(target_parts[i], value_parts[i], h_t)  # h_t None: H = I
        notes = [f"{name}: Hessian damping raised from {cfg.damping:g} to {damping:g} to make it positive definite"
                 ] if damping != cfg.damping else []
        notes += [w for w in [proxy_warning(name, proxy, cfg.bits)] if w]
        record = LayerRecord(
            name=name,
            shape=(linear.out_features, linear.in_features),
            proxy=proxy,
            bits=layer.stored_bits() / (linear.out_features * linear.in_features),
            seconds=elapsed,
            greedy_sweeps=solution.greedy_sweeps,
            damping=damping,
            dead_inputs=dead,
            warnings=tuple(notes),
            iterations=tuple(solution.history[i]) if solution.history else (),
        )
        results.append((layer, record))
    return results
