"""Hadamard matrices of many orders, the fast Walsh-Hadamard transform, and orthonormal `Had_n`.

`Had_n = (H_K ⊗ H_{2^k}) / sqrt(n)` for `n = K * 2^k`, where `H_K` is generated here (Sylvester,
Paley I and II over any finite field GF(q), and Kronecker products of those) and `H_{2^k}` is
applied with the O(n log n) butterfly. Dimensions with no such factor use an orthonormal DCT
(also O(n log n) through the FFT), so every `n` has a fast, incoherent orthogonal transform.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

# Largest Hadamard factor H_K used; applying it costs K multiply-adds per element.
MAX_FACTOR = 1024


# ---------------------------------------------------------------------------------------------
# Finite fields GF(p^e), just enough for the quadratic character used by Paley's constructions.


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, e) with q = p^e and p prime, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    e, r = 0, q
    while r % p == 0:
        r //= p
        e += 1
    return (p, e) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of polynomial `a` modulo monic `f` over GF(p); coefficients low degree first."""
    a = list(a)
    deg = len(f) - 1
    for i in range(len(a) - 1, deg - 1, -1):
        c = a[i] % p
        if c:
            for j in range(deg + 1):
                a[i - deg + j] = (a[i - deg + j] - c * f[j]) % p
    return [x % p for x in a[:deg]] + [0] * max(0, deg - len(a))


def _irreducible(p: int, e: int) -> list[int]:
    """The first monic irreducible polynomial of degree e over GF(p), in counting order."""
    for tail in range(p**e):
        f = [(tail // p**i) % p for i in range(e)] + [1]
        if f[0] == 0:
            continue
        irreducible = True
        for d in range(1, e // 2 + 1):
            for low in range(p**d):
                g = [(low // p**i) % p for i in range(d)] + [1]
                if not any(_poly_mod(f, g, p)):
                    irreducible = False
                    break
            if not irreducible:
                break
        if irreducible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {e} over GF({p})")


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """(digits [q, e], chi [q]): base-p digits of each element and its quadratic character in {-1, 0, 1}."""
    p, e = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(x // p**i) % p for i in range(e)] for x in range(q)], dtype=np.int64)
    f = _irreducible(p, e) if e > 1 else [0, 1]
    powers = p ** np.arange(e)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    for x in range(1, q):
        square = np.convolve(digits[x], digits[x]) % p
        chi[int(np.dot(_poly_mod(list(square), f, p) if e > 1 else square[:1], powers))] = 1
    return digits, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = chi(a - b) over GF(q)."""
    p, _ = _prime_power(q)  # type: ignore[misc]
    digits, chi = _quadratic_character(q)
    powers = p ** np.arange(digits.shape[1])
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ powers]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for q ≡ 3 (mod 4): I + S with S the skew conference matrix."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1) for q ≡ 1 (mod 4), from the symmetric conference matrix."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]]))


@lru_cache(maxsize=None)
def _recipe(order: int) -> tuple | None:
    """How to build a Hadamard matrix of `order`, or None when these constructions cannot."""
    if order == 1:
        return ("one",)
    if order == 2:
        return ("two",)
    if order % 4:
        return None
    q = order - 1
    pe = _prime_power(q)
    if pe and q % 4 == 3:
        return ("paley1", q)
    if order % 8 == 4:
        q = order // 2 - 1
        pe = _prime_power(q)
        if pe and q % 4 == 1:
            return ("paley2", q)
    for a in range(2, math.isqrt(order) + 1):
        if order % a == 0 and _recipe(a) and _recipe(order // a):
            return ("kron", a, order // a)
    return None


@lru_cache(maxsize=None)
def _hadamard_np(order: int) -> np.ndarray:
    recipe = _recipe(order)
    if recipe is None:
        raise ValueError(f"no Hadamard construction for order {order}")
    kind = recipe[0]
    if kind == "one":
        return np.ones((1, 1), dtype=np.int64)
    if kind == "two":
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if kind == "paley1":
        return _paley1(recipe[1])
    if kind == "paley2":
        return _paley2(recipe[1])
    return np.kron(_hadamard_np(recipe[1]), _hadamard_np(recipe[2]))


def has_hadamard(order: int) -> bool:
    """Whether `hadamard_matrix(order)` can be constructed here."""
    return _recipe(order) is not None


def hadamard_matrix(order: int) -> Tensor:
    """A ±1 Hadamard matrix H [order, order] with H H^T = order * I (float32, cached)."""
    return torch.from_numpy(_hadamard_np(order).astype(np.float32))


def hadamard_factor(n: int) -> int | None:
    """The smallest K <= MAX_FACTOR with n = K * 2^k and a constructible H_K, or None."""
    k = n
    while k % 2 == 0 and k > 1:
        k //= 2
    while k <= min(n, MAX_FACTOR):
        if n % k == 0 and has_hadamard(k):
            return k
        k *= 2
    return None


# ---------------------------------------------------------------------------------------------
# Fast transforms on the last dimension of a tensor.


# Butterfly stages below this width run as one dense matmul with the Sylvester matrix (BLAS beats
# log2(width) memory passes there); wider transforms continue with butterflies.
_DENSE_WIDTH = 128


@lru_cache(maxsize=16)
def _sylvester(n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h.to(device)


def fwht(x: Tensor) -> Tensor:
    """Unnormalised Walsh-Hadamard transform of the last dim (a power of two): H_{2^k} x, O(n log n).

    The first log2(128) butterfly stages are one matmul with the 128 x 128 Sylvester matrix, the
    rest are in-place butterflies on two ping-pong buffers.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    width = min(n, _DENSE_WIDTH)
    buf = (x.reshape(*lead, n // width, width) @ _sylvester(width, x.device, x.dtype)).reshape(*lead, n)
    if width == n:
        return buf
    out = torch.empty_like(buf)
    h = width
    while h < n:
        y, o = buf.view(*lead, n // (2 * h), 2, h), out.view(*lead, n // (2 * h), 2, h)
        torch.add(y[..., 0, :], y[..., 1, :], out=o[..., 0, :])
        torch.sub(y[..., 0, :], y[..., 1, :], out=o[..., 1, :])
        buf, out = out, buf
        h *= 2
    return buf


def dct(x: Tensor, inverse: bool = False) -> Tensor:
    """Orthonormal DCT-II of the last dim (inverse: its transpose, DCT-III), through an n-point FFT."""
    n = x.shape[-1]
    k = torch.arange(n, device=x.device, dtype=torch.float64)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64, device=x.device)
    scale[0] = math.sqrt(1.0 / n)
    twiddle = torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))
    order = torch.cat((torch.arange(0, n, 2, device=x.device), torch.arange(n - 1 - n % 2, 0, -2, device=x.device)))
    xd = x.double()
    if not inverse:
        v = torch.fft.fft(xd[..., order])
        return (torch.real(v * twiddle) * scale).to(x.dtype)
    y = xd / scale  # the unnormalised DCT-II values; invert them exactly
    y_rev = torch.cat((torch.zeros_like(y[..., :1]), y.flip(-1)[..., :-1]), dim=-1)  # y[n - k], y[n] = 0
    v = torch.fft.ifft(torch.complex(y, -y_rev) / twiddle).real
    out = torch.empty_like(v)
    out[..., order] = v
    return out.to(x.dtype)


class OrthogonalOp:
    """An orthonormal n x n matrix Had_n applied in O(n log n): Hadamard when possible, else DCT."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.factor = hadamard_factor(n)
        self._hk: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    @property
    def kind(self) -> str:
        return "hadamard" if self.factor is not None else "dct"

    def _matrix_k(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._hk:
            self._hk[key] = hadamard_matrix(self.factor).to(device=like.device, dtype=like.dtype)
        return self._hk[key]

    def apply(self, x: Tensor, transpose: bool = False) -> Tensor:
        """Had_n x (or Had_n^T x) along the last dim of `x` [..., n]."""
        if self.factor is None:
            return dct(x, inverse=transpose)
        k = self.factor
        lead = x.shape[:-1]
        y = fwht(x.reshape(*lead, k, self.n // k))
        if k > 1:
            hk = self._matrix_k(y)
            y = torch.matmul(hk.t() if transpose else hk, y)
        return y.reshape(*lead, self.n) * (1.0 / math.sqrt(self.n))

    def dense(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The matrix itself [n, n] (for tests and small dims)."""
        return self.apply(torch.eye(self.n, dtype=dtype)).t().contiguous()


@lru_cache(maxsize=None)
def orthogonal_op(n: int) -> OrthogonalOp:
    return OrthogonalOp(n)
