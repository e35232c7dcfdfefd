"""quipkit's compiled helpers (built from src/quipkit/_native by the package install), with checks.

The C routines take raw buffer addresses, so every wrapper here makes its tensors contiguous, on
the CPU and of the right dtype first, and splits large inputs across threads (the C code releases
the GIL). `available()` says whether the extension was built; callers fall back to torch code.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import torch
from torch import Tensor

try:
    from quipkit import _native
except ImportError:  # no C compiler at install time
    _native = None


def available() -> bool:
    return _native is not None


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()))


def _split(count: int, minimum: int = 4096) -> list[tuple[int, int]]:
    parts = max(1, min(torch.get_num_threads(), count // minimum))
    bounds = [count * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]


def e8p_nearest(x: Tensor, patterns: Tensor, lookup: Tensor) -> Tensor:
    """Codes [N] (int32) of the nearest E8P codewords to x [N, 8]; patterns [256, 8] f32, lookup [4^8] i32."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    patterns = patterns.to("cpu", torch.float32).contiguous()
    lookup = lookup.to("cpu", torch.int32).contiguous()
    codes = torch.empty(x.shape[0], dtype=torch.int32)

    def run(span: tuple[int, int]) -> None:
        lo, hi = span
        _native.e8p_nearest(
            x.data_ptr() + lo * 32, hi - lo, patterns.data_ptr(), lookup.data_ptr(), codes.data_ptr() + lo * 4
        )

    list(_pool().map(run, _split(x.shape[0])))
    return codes


def e8p_two_nearest(x: Tensor, patterns: Tensor) -> Tensor:
    """Codes [N, 2] (int32) of the nearest and second-nearest E8P codewords to x [N, 8]."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    patterns = patterns.to("cpu", torch.float32).contiguous()
    codes = torch.empty(x.shape[0], 2, dtype=torch.int32)

    def run(span: tuple[int, int]) -> None:
        lo, hi = span
        _native.e8p_two_nearest(x.data_ptr() + lo * 32, hi - lo, patterns.data_ptr(), codes.data_ptr() + lo * 8)

    list(_pool().map(run, _split(x.shape[0])))
    return codes
