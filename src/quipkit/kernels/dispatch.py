"""Pick the kernel for a codebook, a device and a number of activation rows.

A kernel is a name, the codebooks and device it serves, a predicate and a function
`run(x [..., cols] float32 contiguous, tensors, codebook, rows, cols) -> [..., rows]`. Kernels are tried in
registration order and the first whose predicate accepts wins; the eager reference always applies.
Device kernels register when their module is imported: `cpu` with this module, `triton` the first
time a CUDA tensor arrives, so importing quipkit never imports Triton or initialises CUDA.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import Tensor

from quipkit.codebooks import make_codebook
from quipkit.kernels import activations
from quipkit.kernels.reference import reference_hadamard, reference_matmul

Run = Callable[[Tensor, Sequence[Tensor], object, int, int], Tensor]
Predicate = Callable[[Tensor, object, int, int], bool]


@dataclass(frozen=True)
class Kernel:
    name: str
    codebooks: frozenset[str]
    device: str
    applies: Predicate
    run: Run
    rounds_activations: bool = False  # rounds to int8 itself where activations.rounds says so (the C matvec)


KERNELS: list[Kernel] = []
REFERENCE = Kernel("reference", frozenset(), "any", lambda *_: True, reference_matmul)


@dataclass(frozen=True)
class HadamardKernel:
    name: str
    device: str
    applies: Callable[[Tensor], bool]
    run: Callable[[Tensor, Tensor | None, Tensor | None, bool], Tensor]


HADAMARD_KERNELS: list[HadamardKernel] = []
HADAMARD_REFERENCE = HadamardKernel("reference", "any", lambda _: True, reference_hadamard)
# Device type -> module whose import registers that device's kernels (once, lazily).
_DEVICE_MODULES = {"cpu": "quipkit.kernels.cpu", "cuda": "quipkit.kernels.triton"}
_loaded: set[str] = set()


def register_kernel(name: str, codebooks: Sequence[str], device: str, applies: Predicate, run: Run,
                    rounds_activations: bool = False) -> Kernel:
    kernel = Kernel(name, frozenset(codebooks), device, applies, run, rounds_activations)
    KERNELS.append(kernel)
    return kernel


def register_hadamard(name: str, device: str, applies: Callable[[Tensor], bool], run) -> HadamardKernel:
    kernel = HadamardKernel(name, device, applies, run)
    HADAMARD_KERNELS.append(kernel)
    return kernel


def reference_only() -> bool:
    """QUIPKIT_KERNELS=reference runs everything through the eager reference (for checks and debugging)."""
    return os.environ.get("QUIPKIT_KERNELS", "").lower() == "reference"


REFERENCE_ONLY = reference_only()  # read once; forget_choices() reads it again


def _load_device(device: str) -> None:
    if device in _loaded:
        return
    _loaded.add(device)
    module = _DEVICE_MODULES.get(device)
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError:  # e.g. no triton installed: the reference serves this device
            pass


@lru_cache(maxsize=1024)
def codebook_for(spec: str):
    """The codebook a kernel spec (its JSON) describes; built once per distinct spec."""
    return make_codebook(json.loads(spec))


def spec_of(codebook) -> str:
    return json.dumps(codebook.spec(), sort_keys=True)


def select_kernel(x: Tensor, codebook, rows: int, cols: int) -> Kernel:
    """The first registered kernel for x's device and the codebook that accepts x [B, cols].

    Predicates look only at the device, the codebook, the shape and the number of activation rows, so
    the choice is remembered per (codebook, device, rows of x, rows, cols)."""
    key = (codebook, x.device.type, x.numel() // cols, rows, cols)
    kernel = _chosen.get(key)
    if kernel is None:
        if len(_chosen) > 65536:
            _chosen.clear()
        kernel = _chosen[key] = _select(x, codebook, rows, cols)
    return kernel


_chosen: dict[tuple, Kernel] = {}


def forget_choices() -> None:
    """Select afresh on the next call (after QUIPKIT_KERNELS or the registered kernels changed)."""
    global REFERENCE_ONLY
    REFERENCE_ONLY = reference_only()
    _chosen.clear()
    _chosen_hadamard.clear()


def _select(x: Tensor, codebook, rows: int, cols: int) -> Kernel:
    device = x.device.type
    _load_device(device)
    if REFERENCE_ONLY:
        return REFERENCE
    for kernel in KERNELS:
        if kernel.device in (device, "any") and codebook.name in kernel.codebooks and kernel.applies(x, codebook, rows, cols):
            return kernel
    if device == "cpu" and codebook.name != "dense":
        from quipkit import native

        if not native.available():
            _say_once("quipkit: the compiled kernels are not available here, so quantized layers run the eager "
                      "reference (slow); `quipkit info --kernels` says why")
        else:
            _say_once(f"quipkit: no compiled kernel serves the '{codebook.name}' codebook yet; its layers run the "
                      "eager reference (decoding the weight every call)")
    return REFERENCE


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        print(message, file=sys.stderr)


def select_hadamard(x: Tensor) -> HadamardKernel:
    key = (x.device.type, x.shape[-1])
    kernel = _chosen_hadamard.get(key)
    if kernel is None:
        kernel = _chosen_hadamard[key] = _select_hadamard(x)
    return kernel


_chosen_hadamard: dict[tuple, HadamardKernel] = {}


def _select_hadamard(x: Tensor) -> HadamardKernel:
    device = x.device.type
    _load_device(device)
    if REFERENCE_ONLY:
        return HADAMARD_REFERENCE
    for kernel in HADAMARD_KERNELS:
        if kernel.device in (device, "any") and kernel.applies(x):
            return kernel
    return HADAMARD_REFERENCE


def run_decode_matmul(x: Tensor, tensors: Sequence[Tensor], spec: str, rows: int, cols: int) -> Tensor:
    """x [..., cols] @ W^T -> [..., rows] with the selected kernel, in float32, returned in x's dtype."""
    codebook = codebook_for(spec)
    if x.dtype == torch.float64:  # the kernels compute in float32; keep a float64 caller exact
        return REFERENCE.run(x, tensors, codebook, rows, cols)
    dtype = x.dtype
    if dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    kernel = select_kernel(x, codebook, rows, cols)
    if not kernel.rounds_activations and activations.rounds(codebook, cols):
        x = activations.rounded_fast(x)  # every path of an int8-activation layer sees the integer kernel's numbers
    y = kernel.run(x, tensors, codebook, rows, cols)
    return y if dtype == torch.float32 else y.to(dtype)


def run_hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """post ⊙ Had_n^(T if transpose) (pre ⊙ x) along the last dim, in float32, returned in x's dtype."""
    if x.dtype == torch.float64:
        return reference_hadamard(x, pre, post, transpose)
    dtype = x.dtype
    if dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    y = select_hadamard(x).run(x, pre, post, transpose)
    return y if dtype == torch.float32 else y.to(dtype)


def _dense_matmul(x: Tensor, tensors: Sequence[Tensor], codebook, rows: int, cols: int) -> Tensor:
    return x @ tensors[0].to(x.dtype).t()


# A held float32 weight (QuantizedLinear.keep_decoded) is one torch matmul on any device.
register_kernel("torch-dense", ["dense"], "any", lambda x, codebook, rows, cols: codebook.bits == 32, _dense_matmul)
