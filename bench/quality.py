"""Perplexity of quantized models on the reference model, side by side with the fp reference.

    python bench/quality.py --methods rtn:4,gptq:4,quip#:2 [--ppl wt2-512x40,c4-512x40] [--model M]
                            [--nsamples 128] [--save-dir runs/bench] [--finetune e2e]

Loads the model once, evaluates the float reference, then for each METHOD:BITS quantizes a fresh
copy with default calibration (and fine-tunes it with --finetune), evaluates it (perplexity, and the
KL divergence from the float model on the same windows), and prints one JSON object per (model,
protocol).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from common import cached_targets, machine
from quipkit.api import quantize
from quipkit.config import CalibrationConfig, make_config
from quipkit.eval.divergence import kl_to_reference
from quipkit.eval.perplexity import perplexity, protocol
from quipkit.layers.quantized_linear import keep_decoded
from quipkit.pipeline.calibration import calibration_tokens
from quipkit.pipeline.finetune import FinetuneOptions, block_record, finetune_e2e, teacher_targets
from quipkit.models.loading import load_model, pick_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", required=True, help="comma-separated METHOD:BITS, e.g. gptq:4,quip#:2")
    parser.add_argument("--ppl", default="wt2-512x40")
    parser.add_argument("--model", default=None)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--no-fp", action="store_true", help="skip the float reference")
    parser.add_argument("--save-dir", help="also save each quantized model under this folder")
    parser.add_argument("--device", default=None)
    parser.add_argument("--hessian-cache", help="share calibration Hessians between methods (see quipkit quantize --help)")
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="preset option for every method, e.g. L=12 or incoherence=true")
    parser.add_argument("--finetune", choices=("block", "e2e", "all"),
                        help="fine-tune each quantized model (see quipkit quantize --help)")
    parser.add_argument("--ft-epochs", type=int, default=3)
    parser.add_argument("--ft-lr", type=float, default=2e-3)
    parser.add_argument("--ft-frozen-factors", action="store_true", help="keep CALDERA's factors out of training")
    parser.add_argument("--targets", help="a file caching the float model's fine-tuning targets between runs")
    parser.add_argument("--hessian", choices=("input", "guided"), default="input",
                        help="layer Hessians from the inputs, or guided by the model's loss (see quipkit quantize --help)")
    parser.add_argument("--guided-groups", type=int, default=4)
    args = parser.parse_args()
    device = pick_device(args.device)
    protocols = [protocol(p) for p in args.ppl.split(",")]
    specs = [m.rsplit(":", 1) for m in args.methods.split(",")]
    options = dict(_option(o) for o in args.option)
    configs = [make_config(method, int(bits), **options) for method, bits in specs]  # fail fast on a typo
    reference, tokenizer, source = load_model(args.model)
    calibration = CalibrationConfig(nsamples=args.nsamples, hessian=args.hessian, guided_groups=args.guided_groups)
    tokens = calibration_tokens(tokenizer, calibration) if args.finetune in ("e2e", "all") else None
    targets = None  # the float model's, computed once for every method that fine-tunes

    def report(label: dict, model) -> None:
        held = keep_decoded(model)  # evaluation decodes each weight once (identical logits)
        for proto in protocols:
            if model is reference:
                result, kl = perplexity(model.to(device), tokenizer, proto, device), {}
            else:  # the perplexity from the same forward passes
                result = kl_to_reference(model.to(device), reference, tokenizer, proto, device)
                kl = {"kl_to_fp": result["kl"]}
            line = json.dumps({"bench": "quality", "model": source.describe(), **label, "metric": f"{proto.name} perplexity",
                               "value": result["perplexity"], **kl, "eval_seconds": result["seconds"], "machine": machine()})
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(line + "\n")

    if not args.no_fp:
        report({"method": "fp32", "bits": 32, "bits_per_weight": 32.0, "seconds": 0.0}, reference)
    for config in configs:
        model = copy.deepcopy(reference)
        start = time.perf_counter()
        ft_options = FinetuneOptions(lr=args.ft_lr, epochs=args.ft_epochs, factors=not args.ft_frozen_factors)
        result = quantize(model, tokenizer, config, calibration, device, model_id=source.describe(),
                          hessian_cache=args.hessian_cache,
                          block_finetune=ft_options if args.finetune in ("block", "all") else None)
        seconds = time.perf_counter() - start
        finetuned = {"finetune": [block_record(result.block_finetune)] if result.block_finetune else []}
        if args.finetune and config.low_rank is not None:
            finetuned["ft_factors"] = ft_options.factors
        if args.finetune in ("e2e", "all"):
            if targets is None:
                targets = cached_targets(args.targets, lambda: teacher_targets(reference, tokens, ft_options.top_k))
            finetuned["finetune"].append(finetune_e2e(model, tokens, targets, ft_options))
        label = {"method": config.method, "bits": config.bits, "options": options, "hessian": args.hessian,
                 "bits_per_weight": result.bits_per_weight(),
                 "seconds": seconds, "stage_seconds": result.seconds, "nsamples": args.nsamples,
                 "layers": [{"name": r["name"], "proxy": r["proxy"], **({"iterations": r["iterations"]} if r.get("iterations") else {})}
                            for r in result.layers], **finetuned}
        if args.save_dir:
            from quipkit.formats.checkpoint import save

            suffix = "".join(f"-{k}{v}" for k, v in sorted(options.items()) if k not in ("propagate", "sequential"))
            suffix += "-guided" if args.hessian == "guided" else ""
            suffix += f"-ft{args.finetune}" if args.finetune else ""
            suffix += "-frozen" if args.finetune and args.ft_frozen_factors else ""
            save(model, tokenizer, f"{args.save_dir}/{config.method}{config.bits}{suffix}", config, calibration,
                 finetuned or None, overwrite=True)
        report(label, model)
        del model


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as JSON when it parses (12, true), else as a string (1mad)."""
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
