"""The kernel contract as torch.library ops: tensors and a static spec in, a tensor out.

    quipkit::decode_matmul(Tensor x, Tensor[] tensors, str spec, int rows, int cols) -> Tensor
        x [..., cols] @ W^T -> [..., rows]; W is stored as `tensors` in the order of the codebook's
        storage(rows, cols), and `spec` is the codebook's JSON spec (dispatch.spec_of).
    quipkit::hadamard(Tensor x, Tensor? pre, Tensor? post, bool transpose) -> Tensor
        post ⊙ Had_n^(T if transpose) (pre ⊙ x) along the last dim (the online part of the RHT).

Both have fake implementations, so torch.compile traces through them, and autograd formulas, so
gradients reach the activations (the codes have none). Eager calls from quipkit's layers skip the
dispatcher (a few microseconds each, a few hundred times per token) unless torch.compile is tracing
or a gradient is needed; the computation is the same either way.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from quipkit.kernels.dispatch import codebook_for, run_decode_matmul, run_hadamard
from quipkit.kernels.reference import reference_decode

torch.library.define(
    "quipkit::decode_matmul", "(Tensor x, Tensor[] tensors, str spec, int rows, int cols) -> Tensor"
)
torch.library.define("quipkit::hadamard", "(Tensor x, Tensor? pre, Tensor? post, bool transpose) -> Tensor")


@torch.library.impl("quipkit::decode_matmul", "CompositeExplicitAutograd")
def _decode_matmul_impl(x: Tensor, tensors: list[Tensor], spec: str, rows: int, cols: int) -> Tensor:
    return run_decode_matmul(x, tensors, spec, rows, cols)


@torch.library.register_fake("quipkit::decode_matmul")
def _decode_matmul_fake(x: Tensor, tensors: list[Tensor], spec: str, rows: int, cols: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], rows)


def _decode_matmul_context(ctx, inputs, output) -> None:
    x, tensors, spec, rows, cols = inputs
    ctx.save_for_backward(*tensors)
    ctx.spec, ctx.rows, ctx.cols = spec, rows, cols


def _decode_matmul_backward(ctx, grad: Tensor):
    weight = reference_decode(ctx.saved_tensors, codebook_for(ctx.spec), ctx.rows, ctx.cols)
    return grad @ weight.to(grad.dtype), [None] * len(ctx.saved_tensors), None, None, None


torch.library.register_autograd("quipkit::decode_matmul", _decode_matmul_backward, setup_context=_decode_matmul_context)


@torch.library.impl("quipkit::hadamard", "CompositeExplicitAutograd")
def _hadamard_impl(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    return run_hadamard(x, pre, post, transpose)


@torch.library.register_fake("quipkit::hadamard")
def _hadamard_fake(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    return torch.empty_like(x)


def _hadamard_context(ctx, inputs, output) -> None:
    _, pre, post, transpose = inputs
    ctx.pre, ctx.post, ctx.transpose = pre, post, transpose


def _hadamard_backward(ctx, grad: Tensor):
    # the map is post ⊙ M (pre ⊙ x) with M orthogonal; its transpose is pre ⊙ M^T (post ⊙ g)
    return torch.ops.quipkit.hadamard(grad, ctx.post, ctx.pre, not ctx.transpose), None, None, None


torch.library.register_autograd("quipkit::hadamard", _hadamard_backward, setup_context=_hadamard_context)


def eager_call(x: Tensor) -> bool:
    """True when a call may skip the dispatcher: nothing is being traced and no gradient is needed."""
    return not (torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled()))


def decode_matmul(x: Tensor, tensors: Sequence[Tensor], spec: str, rows: int, cols: int) -> Tensor:
    """x [..., cols] @ W^T -> [..., rows] (see the module docstring)."""
    if not eager_call(x):
        return torch.ops.quipkit.decode_matmul(x, list(tensors), spec, rows, cols)
    return run_decode_matmul(x, tensors, spec, rows, cols)


def hadamard(x: Tensor, pre: Tensor | None, post: Tensor | None, transpose: bool) -> Tensor:
    """post ⊙ Had_n^(T if transpose) (pre ⊙ x) along the last dim of x [..., n]."""
    if not eager_call(x):
        return torch.ops.quipkit.hadamard(x, pre, post, transpose)
    return run_hadamard(x, pre, post, transpose)
