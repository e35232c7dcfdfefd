"""Fine-tune saved quantized checkpoints of the reference model and measure what it changes.

    python bench/finetune.py --models runs/ft/quip#2,runs/ft/qtip2-L12 [--epochs 1] [--lr 2e-3]
                             [--ppl wt2-512x40] [--targets runs/ft/targets.pt] [--save-suffix -fte2e]

For each checkpoint: the quantized model's perplexity and KL divergence from the float model on the
protocol's windows, then `finetune_e2e` on the default calibration (the float model's targets are
computed once, optionally cached in --targets), then the same two numbers again. One JSON line per
model, with the run's record (held-out KL before and after, steps, seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import cached_targets, machine
from quipkit.config import CalibrationConfig
from quipkit.eval.divergence import kl_to_reference
from quipkit.eval.perplexity import protocol
from quipkit.formats.checkpoint import load, save
from quipkit.layers.quantized_linear import keep_decoded
from quipkit.models.loading import load_model
from quipkit.pipeline.calibration import calibration_tokens
from quipkit.pipeline.finetune import FinetuneOptions, finetune_e2e, teacher_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="comma-separated quantized checkpoint folders")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--frozen-factors", action="store_true", help="keep CALDERA's factors out of training")
    parser.add_argument("--ppl", default="wt2-512x40")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--targets", help="a file caching the float model's targets between runs")
    parser.add_argument("--save-suffix", help="save each fine-tuned model next to its source, with this suffix")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    args = parser.parse_args()
    proto = protocol(args.ppl)
    reference, tokenizer, source = load_model(None)
    tokens = calibration_tokens(tokenizer, CalibrationConfig(nsamples=args.nsamples))
    options = FinetuneOptions(lr=args.lr, epochs=args.epochs, factors=not args.frozen_factors)
    start = time.perf_counter()
    targets = cached_targets(args.targets, lambda: teacher_targets(reference, tokens, options.top_k))
    teacher_seconds = time.perf_counter() - start

    def measure(model) -> dict:
        keep_decoded(model)  # identical logits, each weight decoded once
        result = kl_to_reference(model, reference, tokenizer, proto)
        keep_decoded(model, False)
        return result

    for folder in args.models.split(","):
        model, _ = load(folder)
        before = measure(model)
        record = finetune_e2e(model, tokens, targets, options)
        after = measure(model)
        if args.save_suffix:
            save(model, tokenizer, folder.rstrip("/") + args.save_suffix, report={"finetune": [record]}, overwrite=True)
        line = json.dumps({"bench": "finetune", "model": source.describe(), "checkpoint": folder, "protocol": proto.name,
                           "before": before, "after": after, "teacher_seconds": teacher_seconds, "finetune": record,
                           "machine": machine()})
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
