"""Architecture coverage: tiny randomly initialised models of many families, each quantized with
several methods, saved, loaded back through plain transformers, compared and sampled.

    python bench/coverage.py [--archs llama,mixtral] [--methods rtn:4,gptq:4,quip#:2] [--out runs/coverage.jsonl]

Prints one JSON line per (architecture, method): the quantized share of the non-embedding parameters,
whether the loaded model's logits equal the in-memory model's, whether it generates, and the error if
any step failed; then a Markdown table for the README.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import transformers

import quipkit
from quipkit.config import CalibrationConfig, make_config
from quipkit.formats.account import checkpoint_account
from quipkit.pipeline.blockwise import quantize_blockwise

DENSE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, vocab_size=256)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)

ARCHS = {
    "llama": (transformers.LlamaConfig, {}),
    "mistral": (transformers.MistralConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "gemma2": (transformers.Gemma2Config, {"head_dim": 16}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "olmo2": (transformers.Olmo2Config, {}),
    "mixtral": (transformers.MixtralConfig, MOE),
    "qwen3-moe": (transformers.Qwen3MoeConfig, {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                               "moe_intermediate_size": 64}),
    "deepseek-v3": (transformers.DeepseekV3Config, {"n_routed_experts": 4, "num_experts_per_tok": 2,
                                                    "moe_intermediate_size": 64, "n_shared_experts": 1,
                                                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                                    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
                                                    "qk_nope_head_dim": 16, "v_head_dim": 16,
                                                    "num_key_value_heads": 4}),
    "gpt-oss": (transformers.GptOssConfig, {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
                                            "intermediate_size": 64}),
}


def _gemma3_vision_language(**text):
    """Gemma 3 with its vision tower (4 blocks, more than the 2 text blocks the search must pick)."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=28,
                  patch_size=14)
    return transformers.Gemma3Config(text_config={**text, "head_dim": 16}, vision_config=vision, mm_tokens_per_image=4)


ARCHS["gemma3-vision-language"] = (_gemma3_vision_language, {})


def tiny(arch: str, seed: int = 0):
    config_class, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_class(**{**DENSE, **extra})
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def cell(arch: str, method: str, bits: int, folder: Path) -> dict:
    row = {"bench": "coverage", "arch": arch, "method": method, "bits": bits}
    step = "build"
    try:
        model = tiny(arch)
        tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
        step = "quantize"
        config = make_config(method, bits, **({"group_size": 32} if method in ("rtn", "gptq") else {}))
        calibration = CalibrationConfig(nsamples=8, seqlen=32, batch_size=4)
        report = quantize_blockwise(model, tokens, config, calibration, torch.device("cpu"))
        step = "save"
        out = quipkit.save(model, None, folder / f"{arch}-{method}{bits}", config, calibration, {"layers": report.layers})
        account = checkpoint_account(out)
        row.update(quantized_share=account.share, bits_per_weight=account.quantized_bits,
                   float_weights=[name for name, _ in account.float_weights[:3]])
        step = "load"
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        probe = tokens[:2, :16]
        with torch.no_grad():
            row["same_logits"] = bool(torch.equal(model(probe).logits, loaded(probe).logits))
            step = "generate"
            new = loaded.generate(probe[:1], max_new_tokens=4, do_sample=False)
        row["generates"] = new.shape[1] == probe.shape[1] + 4
        row["ok"] = row["same_logits"] and row["generates"]
    except Exception as err:  # a bench records what failed and goes on to the next cell
        row.update(ok=False, failed_at=step, error=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        if "--trace" in sys.argv:
            traceback.print_exc()
    return row


def table(rows: list[dict]) -> str:
    methods = list(dict.fromkeys(f"{r['method']} {r['bits']}" for r in rows))
    lines = ["| architecture | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for arch in dict.fromkeys(r["arch"] for r in rows):
        cells = []
        for label in methods:
            r = next(r for r in rows if r["arch"] == arch and f"{r['method']} {r['bits']}" == label)
            if "error" in r:
                cells.append(f"fails at {r['failed_at']}")
            else:
                marks = ("loads =" if r["same_logits"] else "logits differ") + (", generates" if r["generates"] else "")
                cells.append(f"{r['quantized_share']:.0%} quantized, {marks}")
        lines.append(f"| {arch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--methods", default="rtn:4,gptq:4,quip#:2")
    parser.add_argument("--out", help="append the JSON lines here too")
    parser.add_argument("--trace", action="store_true", help="print the traceback of a failing cell")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            for spec in args.methods.split(","):
                method, bits = spec.split(":")
                start = time.perf_counter()
                row = cell(arch, method, int(bits), Path(tmp))
                row["seconds"] = round(time.perf_counter() - start, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        with open(args.out, "a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    print(table(rows))


if __name__ == "__main__":
    main()
