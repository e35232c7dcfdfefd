"""QuIP's incoherence processing: optional diagonal rescaling, then `U = (U_p ⊗ U_q) P`.

`U_p`, `U_q` are seeded Haar-random orthogonal factors with `p * q = n`, `p <= q` as balanced as
`n`'s divisors allow (a prime `n` gets `p = 1`), and `P` a seeded permutation. Applying `U` costs
O(n (p + q)) per vector. Only the seeds are stored; the factors are regenerated (on the CPU, so
every machine gets the same matrices) and cached per device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from quipkit.transforms.base import Params, Transform, register_transform


def balanced_factors(n: int) -> tuple[int, int]:
    """(p, q) with p * q = n and p the largest divisor <= sqrt(n)."""
    p = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return p, n // p


def haar_orthogonal(size: int, gen: torch.Generator) -> Tensor:
    """A Haar-distributed random orthogonal matrix [size, size] (float64)."""
    q, r = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class KroneckerOp:
    """The orthogonal map x -> (U_p ⊗ U_q) x[perm] for one (n, seed)."""

    def __init__(self, n: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.n = n
        self.p, self.q = balanced_factors(n)
        self.perm = torch.randperm(n, generator=gen)
        self.inverse_perm = torch.argsort(self.perm)
        self.up = haar_orthogonal(self.p, gen)
        self.uq = haar_orthogonal(self.q, gen)
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, ...]] = {}

    def _on(self, like: Tensor) -> tuple[Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache[key] = tuple(
                t.to(device=like.device, dtype=like.dtype if t.is_floating_point() else t.dtype)
                for t in (self.up, self.uq, self.perm, self.inverse_perm)
            )
        return self._cache[key]

    def apply(self, x: Tensor, transpose: bool = False) -> Tensor:
        """U x (or U^T x) along the last dim of `x` [..., n]."""
        up, uq, perm, inverse_perm = self._on(x)
        lead = x.shape[:-1]
        if not transpose:
            y = x[..., perm].reshape(*lead, self.p, self.q)
            return torch.matmul(torch.matmul(up, y), uq.t()).reshape(*lead, self.n)
        y = x.reshape(*lead, self.p, self.q)
        y = torch.matmul(torch.matmul(up.t(), y), uq).reshape(*lead, self.n)
        return y[..., inverse_perm]


@lru_cache(maxsize=512)
def kronecker_op(n: int, seed: int) -> KroneckerOp:
    return KroneckerOp(n, seed)


def rescale_factors(hessian: Tensor, weight: Tensor) -> Tensor:
    """QuIP's diagonal rescale d_j = (H_jj / ||W[:, j]||^2)^(1/4) [n], which balances W and H."""
    col_norm = weight.double().square().sum(0).clamp_min(1e-20)
    diag = torch.diagonal(hessian).double().clamp_min(1e-20)
    d = (diag / col_norm).pow(0.25)
    return (d / d.mean()).float()


@register_transform("kronecker")
class RandomKronecker(Transform):
    """QuIP: W~ = U (W D) V^T, H~ = V D^-1 H D^-1 V^T, with V, U seeded Kronecker orthogonals."""

    def __init__(self, rescale: bool = True) -> None:
        self.rescale = rescale
        self.uses_hessian = rescale

    def spec(self) -> dict:
        return {"name": self.name, "rescale": self.rescale}

    def fit_input(self, hessian: Tensor, weights: list[Tensor], seed: int) -> Params:
        params = {"seed_in": torch.tensor([seed], dtype=torch.int64)}
        if self.rescale:
            params["rescale"] = rescale_factors(hessian, weights[0] if len(weights) == 1 else torch.cat(weights))
        return params

    def fit_output(self, rows: int, seed: int) -> Params:
        return {"seed_out": torch.tensor([seed], dtype=torch.int64), "sv": torch.ones(rows, dtype=torch.float16)}

    def _in(self, params: Params, n: int) -> KroneckerOp:
        return kronecker_op(n, int(params["seed_in"][0]))

    def _out(self, params: Params, m: int) -> KroneckerOp:
        return kronecker_op(m, int(params["seed_out"][0]))

    def weight(self, weight: Tensor, params: Params) -> Tensor:
        m, n = weight.shape
        w = weight * params["rescale"].to(weight) if self.rescale else weight
        w = self._in(params, n).apply(w)  # rows: V r, i.e. W V^T
        return self._out(params, m).apply(w.t()).t()  # U (.)

    def hessian(self, hessian: Tensor, params: Params, consume: bool = False) -> Tensor:
        n = hessian.shape[0]
        h = hessian
        if self.rescale:
            inv = 1.0 / params["rescale"].to(h)
            h = h * inv.unsqueeze(0) * inv.unsqueeze(1)
        op = self._in(params, n)
        first = op.apply(h).t()
        if consume:
            hessian.set_()
        return op.apply(first).t()

    def input(self, x: Tensor, params: Params) -> Tensor:
        if self.rescale:
            x = x / params["rescale"].to(x)
        return self._in(params, x.shape[-1]).apply(x)

    def output(self, y: Tensor, params: Params) -> Tensor:
        return self._out(params, y.shape[-1]).apply(y, transpose=True) * params["sv"].to(y)

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        out = {"seed_in": ((1,), torch.int64), "seed_out": ((1,), torch.int64), "sv": ((rows,), torch.float16)}
        if self.rescale:
            out["rescale"] = ((cols,), torch.float32)
        return out
