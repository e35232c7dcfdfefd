"""Capture what each decoder block is called with, without running the blocks.

Every block is temporarily replaced by a stand-in that records its call (hidden states and keyword
arguments such as the attention mask and rotary embeddings) and passes the hidden states through.
One pass of the model per calibration batch then yields block 0's inputs and every block's own
keyword arguments (masks can differ per block, e.g. sliding-window layers), at the cost of the
embedding alone: the last stand-in stops the forward before the final norm and output head.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn


class _StopForward(Exception):
    pass


class _StandIn(nn.Module):
    """Records (hidden, kwargs) for its block; exposes the block's attributes (e.g. attention_type)."""

    def __init__(self, block: nn.Module, record: "BlockCalls", index: int, last: bool, returns_tuple: bool) -> None:
        super().__init__()
        self.block = block
        self.record = record
        self.index = index
        self.last = last
        self.returns_tuple = returns_tuple

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any):
        if args:
            raise TypeError("decoder blocks called with positional arguments beyond the hidden states are not supported")
        self.record.add(self.index, hidden, kwargs)
        if self.last:
            raise _StopForward
        return (hidden,) if self.returns_tuple else hidden


@dataclass
class BlockCalls:
    """Block 0's input for each batch, and each block's keyword arguments for each batch."""

    inputs: list[Tensor] = field(default_factory=list)  # [batch] -> hidden [b, T, d]
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)  # [block][batch] -> kwargs
    returns_tuple: bool = False  # whether the blocks return (hidden, ...) rather than hidden

    def add(self, index: int, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        if index == 0:
            self.inputs.append(hidden.detach())
        while len(self.kwargs) <= index:
            self.kwargs.append([])
        self.kwargs[index].append(_detach(kwargs))


def _detach(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_detach(v) for v in value)
    return value


def move(value: Any, device: torch.device) -> Any:
    """`value` (tensors nested in dicts, tuples, lists) on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: move(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device) for v in value)
    return value


def block_output(result: Any) -> Tensor:
    """The hidden states a decoder block returned (a tensor, or the first item of a tuple)."""
    return result[0] if isinstance(result, (tuple, list)) else result


@torch.no_grad()
def capture_block_calls(model: nn.Module, blocks: nn.ModuleList, batches: list[Tensor]) -> BlockCalls:
    """Run `model` on each token batch [b, T] with its blocks stood in for; return what they received."""
    originals = list(blocks)
    # Whether blocks return a tuple (older transformers) or a tensor decides what stand-ins return.
    returns_tuple = _returns_tuple(model, blocks, batches[0][:1])
    record = BlockCalls(returns_tuple=returns_tuple)
    try:
        for i, block in enumerate(originals):
            blocks[i] = _StandIn(block, record, i, last=i == len(originals) - 1, returns_tuple=returns_tuple)
        _run_batches(model, batches)
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
    return record


def _run_batches(model: nn.Module, batches: list[Tensor]) -> None:
    """The model's forward on each token batch, each ending where a stand-in or hook stops it."""
    for batch in batches:
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForward:
            pass


def _returns_tuple(model: nn.Module, blocks: nn.ModuleList, tokens: Tensor) -> bool:
    seen: list[bool] = []

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        seen.append(isinstance(output, (tuple, list)))
        raise _StopForward

    handle = blocks[0].register_forward_hook(hook)
    try:
        model(input_ids=tokens, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return bool(seen and seen[0])


class _Replay(nn.Module):
    """Stands in for block 0 and returns given hidden states (the last block's outputs) instead."""

    def __init__(self, outputs: list[Tensor], returns_tuple: bool) -> None:
        super().__init__()
        self.outputs, self.batch, self.returns_tuple = outputs, 0, returns_tuple

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any):
        out = self.outputs[self.batch].to(hidden.device, hidden.dtype)
        self.batch += 1
        return (out,) if self.returns_tuple else out


class _PassThrough(nn.Module):
    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, hidden: Tensor, *args: Any, **kwargs: Any):
        return (hidden,) if self.returns_tuple else hidden


class _Zeros(nn.Module):
    """Stands in for the token embeddings when the blocks replay stored outputs: what they return is
    discarded, so the embedding matrix need not be in memory (a streamed model's stays on disk)."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim, self.dtype = dim, dtype

    def forward(self, ids: Tensor) -> Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype)


@contextmanager
def _after_blocks(model: nn.Module, blocks: nn.ModuleList, final_outputs: list[Tensor] | None, returns_tuple: bool):
    """With `final_outputs` (the last block's outputs per batch), the embeddings and blocks stand aside
    while the model runs: block 0 replays the outputs and the others pass them on. Without, nothing
    changes."""
    originals = list(blocks)
    embeddings = model.get_input_embeddings()
    try:
        if final_outputs is not None:
            for i in range(len(originals)):
                blocks[i] = _Replay(final_outputs, returns_tuple) if i == 0 else _PassThrough(returns_tuple)
            model.set_input_embeddings(_Zeros(final_outputs[0].shape[-1], compute_dtype(model)))
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
        model.set_input_embeddings(embeddings)


@torch.no_grad()
def capture_head_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[Tensor], head: nn.Module,
                        record, final_outputs: list[Tensor] | None = None, returns_tuple: bool = False) -> None:
    """Call `record(x)` with the output head's input for each token batch [b, T], then stop the forward.

    With `final_outputs` (the last block's outputs per batch; `returns_tuple` says what blocks return)
    neither the embeddings nor the blocks run: only what follows the blocks (the final norm).
    Without, the whole model runs up to the head.
    """
    def hook(module: nn.Module, args: tuple) -> None:
        record(args[0])
        raise _StopForward

    handle = head.register_forward_pre_hook(hook)
    try:
        with _after_blocks(model, blocks, final_outputs, returns_tuple):
            _run_batches(model, batches)
    finally:
        handle.remove()


@torch.no_grad()
def logits_after_blocks(model: nn.Module, blocks: nn.ModuleList, batches: list[Tensor], final_outputs: list[Tensor],
                        returns_tuple: bool) -> list[Tensor]:
    """The model's logits [b, T, V] for each token batch [b, T] whose last block's outputs are
    `final_outputs`, running only what follows the blocks (final norm, head, soft-capping)."""
    with _after_blocks(model, blocks, final_outputs, returns_tuple):
        return [model(input_ids=batch, use_cache=False).logits for batch in batches]


def run_block(block: nn.Module, inputs: Sequence[Tensor], kwargs: list[dict], device: torch.device, after=None,
              store: torch.dtype | None = None, into: Any = None) -> Any:
    """The block's outputs for each batch of inputs (on the CPU, in `store` dtype, default the outputs'
    own), appended to `into` (default: a new list); inputs held in another dtype are computed in the
    block's. `after` runs after each batch."""
    compute = compute_dtype(block)
    outputs = into if into is not None else []
    for x, kw in zip(inputs, kwargs):
        out = block_output(block(x.to(device, compute), **move(kw, device)))
        outputs.append(out.detach().to("cpu", store or out.dtype))
        if after is not None:
            after()
    return outputs


def compute_dtype(block: nn.Module) -> torch.dtype:
    """The dtype the block computes in: its first float parameter's (float32 when it has none)."""
    return next((p.dtype for p in block.parameters() if p.is_floating_point()), torch.float32)
