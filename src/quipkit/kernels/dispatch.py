"""Pick the fastest decode-and-multiply kernel that applies to a layer and input.

Each kernel is (name, predicate, function); the first whose predicate accepts wins, and the eager
reference always applies. Fast kernels register themselves here when their module is imported, so
importing quipkit never imports Triton or compiles anything.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from quipkit.kernels.reference import reference_matmul

Kernel = Callable[[Tensor, object], Tensor]
Predicate = Callable[[Tensor, object], bool]
KERNELS: list[tuple[str, Predicate, Kernel]] = []


def register_kernel(name: str, applies: Predicate, kernel: Kernel) -> None:
    KERNELS.append((name, applies, kernel))


def select_kernel(x: Tensor, layer) -> tuple[str, Kernel]:
    for name, applies, kernel in KERNELS:
        if applies(x, layer):
            return name, kernel
    return "reference", reference_matmul


def decode_matmul(x: Tensor, layer) -> Tensor:
    """x [..., n] -> x @ Ŵ~^T [..., m] with the best applicable kernel."""
    return select_kernel(x, layer)[1](x, layer)
