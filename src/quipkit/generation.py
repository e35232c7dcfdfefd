"""A lean greedy decoding loop for any causal LM transformers loads, with timing and memory.

transformers' `generate` spends several milliseconds per token on logits processors, stopping
criteria and cache bookkeeping, which is as much as a quantized small model's whole forward on a
CPU. This loop does what gpt-fast does: a cache sized for the prompt and the new tokens, one prefill
forward that computes the last position's logits only, then one forward and one argmax per token.
The forward is `LeanDecoder` (lean_decoder.py) for the Llama layout it accepts, else the model's
own with a static KV cache (a dynamic one for models whose forward takes no static cache).
`compile=True` wraps the model's own decode step in torch.compile, with CUDA graphs on a GPU; on
the CPU it was measured slower than eager (46 against 39 ms per token for QuIP# 2-bit on the
reference model), so it is opt-in.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from quipkit.lean_decoder import LeanDecoder


@dataclass
class GenerationStats:
    """Prefill and decode throughput, and the memory the model holds."""

    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    model_bytes: int  # every parameter and buffer of the model, counted once
    peak_rss_bytes: int  # the process's peak resident memory
    forward: str = "transformers"  # whose forward decoded: "lean" (LeanDecoder) or "transformers"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first (which comes from the prefill) per second of decoding."""
        return max(self.new_tokens - 1, 0) / max(self.decode_seconds, 1e-9)

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_tokens_per_second": self.prefill_tokens_per_second,
                "decode_tokens_per_second": self.decode_tokens_per_second}


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor storage the model holds (tied tensors once)."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM), 0 where /proc is not available."""
    try:
        with open(f"/proc/{os.getpid()}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cache_keyword(model: nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache`; use what this model's forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _static_cache(model: nn.Module, length: int):
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=length)
    except (TypeError, ValueError, AttributeError, NotImplementedError):
        return None


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    compile: bool = False,
) -> tuple[list[int], GenerationStats]:
    """Greedy decoding of up to `max_new_tokens` after `input_ids` [1, T]; stops at an EOS token.

    Calls `on_token(id)` as each token is chosen. Returns the new token ids and the timings.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("generate takes one prompt: input_ids [1, T]")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    prompt = input_ids.shape[1]
    lean = None if compile else LeanDecoder.build(model, prompt + max_new_tokens)
    if lean is not None:
        prefill = lean.prefill
        step = lambda ids, position: lean.step(ids)  # noqa: E731 - the decoder tracks the position
    else:
        prefill, step = _transformers_steps(model, prompt + max_new_tokens, device, compile)
    start = time.perf_counter()
    logits = prefill(input_ids)
    token = int(logits.argmax(-1))
    prefilled = time.perf_counter()
    tokens = [token]
    if on_token is not None:
        on_token(token)
    position = prompt
    while len(tokens) < max_new_tokens and token not in eos_token_ids:
        logits = step(torch.tensor([[token]], device=device), position)
        token = int(logits.argmax(-1))
        tokens.append(token)
        position += 1
        if on_token is not None:
            on_token(token)
    done = time.perf_counter()
    stats = GenerationStats(prompt, len(tokens), prefilled - start, done - prefilled, model_bytes(model), peak_rss_bytes(),
                            "lean" if lean is not None else "transformers")
    return tokens, stats


def _transformers_steps(model: nn.Module, length: int, device: torch.device, compile: bool):
    """(prefill(ids [1, T]), step(ids [1, 1], position)) -> last logits [1, vocab], through the
    model's own forward with a static cache of `length` positions (or the dynamic one it returns)."""
    keyword = _cache_keyword(model)
    cache = _static_cache(model, length)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    past = [cache]

    def forward(ids: Tensor, positions: Tensor, held) -> tuple[Tensor, object]:
        out = model(input_ids=ids, cache_position=positions, use_cache=True, **{keyword: held}, **extra)
        return out.logits[:, -1], (held if held is not None and cache is not None else out.past_key_values)

    # on a GPU, CUDA graphs replay the whole step ("reduce-overhead"); CPUs have no such replay
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = torch.compile(forward, dynamic=False, mode=mode) if compile else forward

    def prefill(ids: Tensor) -> Tensor:
        logits, past[0] = forward(ids, torch.arange(ids.shape[1], device=device), past[0])
        return logits

    def step(ids: Tensor, position: int) -> Tensor:
        logits, past[0] = compiled(ids, torch.tensor([position], device=device), past[0])
        return logits

    return prefill, step


def eos_ids(model: nn.Module, tokenizer) -> tuple[int, ...]:
    """The token ids that end a generation: the model's generation config's, else the tokenizer's."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None) if config is not None else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)
