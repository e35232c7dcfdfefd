"""Calibration tokens: seeded random windows of `seqlen` tokens from each calibration source."""

from __future__ import annotations

import torch
from torch import Tensor

from quipkit.config import CalibrationConfig
from quipkit.corpora import CALIBRATION_SOURCES, calibration_text, file_text
from quipkit.errors import QuipkitError


def tokenize(tokenizer, text: str) -> Tensor:
    """All tokens of `text` [L] (int64), with the tokenizer's default special tokens."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.int64)


def check_sources(config: CalibrationConfig) -> None:
    """Fail before any model loads when a local calibration file cannot give one window of
    `seqlen` tokens (every token covers at least one byte, so fewer bytes cannot)."""
    for source in config.sources:
        if source in CALIBRATION_SOURCES or source.startswith("hf:"):
            continue
        size = len(file_text(source).encode("utf-8"))
        if size < config.seqlen:
            what = "is empty" if size == 0 else f"has {size} bytes, too few for one window of {config.seqlen} tokens"
            raise QuipkitError(f"calibration file {source} {what}; pass a longer text or a smaller --seqlen")


def calibration_tokens(tokenizer, config: CalibrationConfig) -> Tensor:
    """[nsamples, seqlen] token windows, split evenly over the sources (earlier ones take the remainder)."""
    count = len(config.sources)
    shares = [config.nsamples // count + (i < config.nsamples % count) for i in range(count)]
    gen = torch.Generator().manual_seed(config.seed)
    windows = []
    for source, share in zip(config.sources, shares):
        if share == 0:
            continue
        ids = tokenize(tokenizer, calibration_text(source))
        if len(ids) < config.seqlen + 1:
            raise QuipkitError(
                f"calibration source '{source}' has {len(ids)} tokens, fewer than one window of {config.seqlen}"
            )
        starts = torch.randint(0, len(ids) - config.seqlen, (share,), generator=gen)
        windows.extend(ids[s : s + config.seqlen] for s in starts.tolist())
    return torch.stack(windows)
