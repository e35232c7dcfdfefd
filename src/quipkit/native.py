"""quipkit's compiled helpers (built from src/quipkit/_native by the package install), with checks.

The C routines take raw buffer addresses, so every wrapper here makes its tensors contiguous, on
the CPU and of the right dtype first, and splits large inputs across threads (the C code releases
the GIL). `available()` says whether the extension was built (QUIPKIT_NATIVE=0 pretends it was not);
callers fall back to torch code.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

try:
    from quipkit import _native
except ImportError:  # no C compiler at install time
    _native = None
if not hasattr(_native, "trellis_encode"):  # a source tree without the build imports _native/ as an empty package
    _native = None
if os.environ.get("QUIPKIT_NATIVE") == "0":  # behave as a machine without the extension would
    _native = None


def available() -> bool:
    return _native is not None


def module():
    """The compiled extension itself (its decode kernels take raw pointers; see quipkit/kernels/cpu.py)."""
    return _native


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


def _in_parallel(count: int, run: Callable[[int, int], None], minimum: int) -> None:
    """Call run(lo, hi) on contiguous slices of range(count), one per thread."""
    parts = max(1, min(torch.get_num_threads(), count // minimum))
    bounds = [count * i // parts for i in range(parts + 1)]
    list(_pool().map(lambda i: run(bounds[i], bounds[i + 1]), range(parts)))


def _cpu(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to("cpu", dtype).contiguous()


def e8p_nearest(x: Tensor, patterns: Tensor, lookup: Tensor) -> Tensor:
    """Codes [N] (int32) of the nearest E8P codewords to x [N, 8]; patterns [256, 8] f32, lookup [4^8] i32."""
    x, patterns, lookup = _cpu(x, torch.float32), _cpu(patterns, torch.float32), _cpu(lookup, torch.int32)
    codes = torch.empty(x.shape[0], dtype=torch.int32)

    def run(lo: int, hi: int) -> None:
        _native.e8p_nearest(x.data_ptr() + lo * 32, hi - lo, patterns.data_ptr(), lookup.data_ptr(),
                            codes.data_ptr() + lo * 4)

    _in_parallel(x.shape[0], run, 4096)
    return codes


def e8p_two_nearest(x: Tensor, patterns: Tensor) -> Tensor:
    """Codes [N, 2] (int32) of the nearest and second-nearest E8P codewords to x [N, 8]."""
    x, patterns = _cpu(x, torch.float32), _cpu(patterns, torch.float32)
    codes = torch.empty(x.shape[0], 2, dtype=torch.int32)

    def run(lo: int, hi: int) -> None:
        _native.e8p_two_nearest(x.data_ptr() + lo * 32, hi - lo, patterns.data_ptr(), codes.data_ptr() + lo * 8)

    _in_parallel(x.shape[0], run, 4096)
    return codes


def trellis_encode(x: Tensor, table: Tensor, L: int, k: int) -> tuple[Tensor, Tensor]:
    """Tail-biting Viterbi of tiles x [B, T] under table [2^L, V] -> (states [B, T / V] int32, costs [B])."""
    x, table = _cpu(x, torch.float32), _cpu(table, torch.float32)
    batch, length = x.shape
    v = table.shape[1]
    states = torch.empty(batch, length // v, dtype=torch.int32)
    costs = torch.empty(batch, dtype=torch.float32)

    def run(lo: int, hi: int) -> None:
        _native.trellis_encode(x.data_ptr() + lo * length * 4, hi - lo, length, L, k, v, table.data_ptr(),
                               states.data_ptr() + lo * (length // v) * 4, costs.data_ptr() + lo * 4)

    _in_parallel(batch, run, 1)
    return states, costs
