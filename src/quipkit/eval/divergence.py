"""KL divergence of a quantized model's next-token distributions from its float reference's.

Perplexity only scores the probability of the true next token; the KL divergence compares the whole
distributions, position by position, so it tells how close a quantized model is to the model it came
from (what fine-tuning optimises) on the same windows as a perplexity protocol. Both come from one
forward of each model.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor, nn

from quipkit.console import Reporter
from quipkit.eval.perplexity import Protocol, protocol_windows, window_nll


@torch.no_grad()
def kl_to_reference(model: nn.Module, reference: nn.Module, tokenizer, proto: Protocol,
                    device: torch.device | str = "cpu", reporter: Reporter | None = None) -> dict:
    """{protocol, kl, perplexity, tokens, seconds}: the mean over every predicted position (each
    window's tokens but its first are predicted) of KL(reference || model) in nats, and the model's
    perplexity on the same windows."""
    start = time.perf_counter()
    kl, nll, positions = kl_on_windows(model, reference, protocol_windows(tokenizer, proto), device, reporter,
                                       proto.name)
    return {"protocol": proto.name, "kl": kl, "perplexity": math.exp(nll), "tokens": positions,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def kl_on_windows(model: nn.Module, reference: nn.Module, windows: Tensor, device: torch.device | str = "cpu",
                  reporter: Reporter | None = None, label: str = "") -> tuple[float, float, int]:
    """(mean KL(reference || model) in nats, the model's mean NLL, positions) over `windows` [count, T]."""
    reporter = reporter or Reporter()
    total, nll, positions = 0.0, 0.0, 0
    with reporter.task(f"KL {label}".strip(), len(windows)) as task:
        for window in windows:
            batch = window[None].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nll += window_nll(logits, batch)
            logq = logits[0, :-1].float().log_softmax(-1)
            logp = reference(input_ids=batch, use_cache=False).logits[0, :-1].float().log_softmax(-1)
            total += float((logp.exp() * (logp - logq)).sum())
            positions += len(logp)
            task.advance(status=f"KL {total / positions:.4f}")
    return total / positions, nll / positions, positions
