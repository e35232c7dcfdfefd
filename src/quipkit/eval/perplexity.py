"""Perplexity under fixed protocols (BENCHMARKS.md), so numbers compare across methods and tools.

A protocol is a text, a window length and a window count: the text is tokenized once, cut into
non-overlapping windows, and the perplexity is exp of the mean NLL over every predicted token
(each window's first token has no context and is not predicted).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from quipkit.console import Reporter
from quipkit.corpora import c4_evaluation_text, file_text, wikitext2
from quipkit.errors import QuipkitError
from quipkit.pipeline.calibration import tokenize


@dataclass(frozen=True)
class Protocol:
    name: str
    text: Callable[[], str]
    seqlen: int
    windows: int | None  # None: every full window


PROTOCOLS = {
    # WikiText-2 test as the raw file (rows concatenated); reproduces the fp reference 28.74.
    "wt2-512x40": Protocol("wt2-512x40", lambda: wikitext2("test"), 512, 40),
    "wt2-2048-full": Protocol("wt2-2048-full", lambda: wikitext2("test"), 2048, None),
    "c4-512x40": Protocol("c4-512x40", c4_evaluation_text, 512, 40),
}
ALIASES = {"wikitext2": "wt2-512x40", "wt2": "wt2-512x40", "c4": "c4-512x40"}


def protocol(name: str) -> Protocol:
    """A named protocol, an alias ('wikitext2', 'c4'), or a .txt/.jsonl file (512-token windows, all)."""
    key = ALIASES.get(name, name)
    if key in PROTOCOLS:
        return PROTOCOLS[key]
    if name.endswith((".txt", ".jsonl", ".raw")):
        return Protocol(name, lambda: file_text(name), 512, None)
    known = ", ".join(list(PROTOCOLS) + list(ALIASES))
    raise QuipkitError(f"unknown perplexity protocol '{name}'; choose one of {known}, or a .txt/.jsonl file")


def quick_protocol(context: int | None = None) -> Protocol:
    """The cheap check after every quantize run: 4 windows of 256 tokens (fewer for a shorter
    context), enough to tell a usable model from garbage."""
    seqlen = min(256, context or 256)
    return Protocol(f"wt2-{seqlen}x4", lambda: wikitext2("test")[:20000], seqlen, 4)


def protocol_windows(tokenizer, proto: Protocol):
    """The protocol's token windows [count, seqlen]."""
    ids = tokenize(tokenizer, proto.text())
    available = len(ids) // proto.seqlen
    count = available if proto.windows is None else proto.windows
    if available < max(count, 1):
        raise QuipkitError(f"{proto.name}: the text has {len(ids)} tokens, fewer than {count} windows of {proto.seqlen}")
    return ids[: count * proto.seqlen].reshape(count, proto.seqlen)


def window_nll(logits, batch) -> float:
    """The summed NLL of every token of `batch` [b, T] after its first, under `logits` [b, T, V]."""
    logits = logits[:, :-1].float()
    return float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum"))


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer,
    proto: Protocol,
    device: torch.device | str = "cpu",
    batch_size: int = 1,
    reporter: Reporter | None = None,
) -> dict:
    """{protocol, perplexity, nll, tokens, windows, seconds} of `model` under `proto`."""
    reporter = reporter or Reporter()
    start = time.perf_counter()
    windows = protocol_windows(tokenizer, proto)
    total, predicted = 0.0, 0
    with reporter.task(f"ppl {proto.name}", len(windows)) as task:
        for batch in torch.split(windows, batch_size):
            batch = batch.to(device)
            total += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
            predicted += batch[:, 1:].numel()
            task.advance(len(batch), status=f"ppl {math.exp(total / predicted):.3f}")
    nll = total / predicted
    return {
        "protocol": proto.name,
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": predicted,
        "windows": len(windows),
        "seconds": time.perf_counter() - start,
    }
