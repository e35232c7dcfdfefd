"""Quantize models bigger than this machine's float32 budget, streamed block by block, and measure the
peak memory of the process that does it.

    python bench/scale.py --shape tinyllama-1.1b --runs gptq:4,quip#:2 [--nsamples 16 --seqlen 256]
    python bench/scale.py --shape llama-2-7b --runs rtn:4,gptq:4 --nsamples 4 --seqlen 128 --generate

Writes a randomly initialised model of the shape as bf16 safetensors shards (once, under --work), then
runs `quipkit quantize` on it in a fresh process per run, which reports its own maximum resident set
size (ru_maxrss). The baseline it is compared with is the model's float32 weights, which the whole-model
path holds before doing anything. With --generate, the result is loaded and generates a few tokens
(in another fresh process, whose peak is reported too). One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _child(argv: list[str]) -> None:
    """Run one quipkit command in this process, then print its peak RSS as a JSON line."""
    from quipkit.cli import main

    start = time.perf_counter()
    code = main(argv)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"rc": code, "peak_rss_bytes": peak, "seconds": time.perf_counter() - start}), flush=True)


def _measured(argv: list[str], log: Path) -> dict:
    """Run `quipkit argv` in a fresh process (its progress appended to `log`); its last JSON line."""
    with open(log, "a") as handle:
        handle.write(f"\n$ quipkit {' '.join(argv)}\n")
        handle.flush()
        done = subprocess.run([sys.executable, __file__, "--child", *argv], stdout=subprocess.PIPE, stderr=handle,
                              text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"rc": done.returncode, "error": done.stdout[-2000:]}
    return json.loads(lines[-1])


def _model(shape: str, folder: Path) -> tuple[Path, int]:
    """The random model of `shape` under `folder` (written on first use) and its parameter count."""
    from quipkit.models.loading import default_gguf, load_tokenizer
    from quipkit.models.synthetic import write_random_llama

    target = folder / shape
    if not (target / "config.json").is_file():
        write_random_llama(target, load_tokenizer(default_gguf()), shape)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    return target, index["metadata"]["total_size"] // 2  # bf16: two bytes per parameter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tinyllama-1.1b", help="tiny, tinyllama-1.1b, llama-2-7b")
    parser.add_argument("--runs", default="gptq:4,quip#:2", help="comma-separated METHOD:BITS")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--work", default="runs/scale", help="where the model and the results go")
    parser.add_argument("--generate", action="store_true", help="load each result and generate 8 tokens")
    parser.add_argument("--check", action="store_true", help="keep the quick perplexity check (off: random weights)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, parameters = _model(args.shape, work)
    write_seconds = time.perf_counter() - start
    log = work / f"{args.shape}.log"
    for run in args.runs.split(","):
        method, bits = run.split(":")
        out = work / f"{args.shape}-{method.replace('#', 's')}{bits}"
        shutil.rmtree(str(out) + ".partial", ignore_errors=True)  # a whole run is measured, never a resumed one
        argv = ["quantize", str(model), "--method", method, "--bits", bits, "--out", str(out), "--overwrite",
                "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--calibration", "wikitext2",
                "--json", str(out) + ".json"] + ([] if args.check else ["--no-check"])
        result = _measured(argv, log)
        row = {"bench": "scale", "shape": args.shape, "parameters": parameters, "method": method, "bits": int(bits),
               "nsamples": args.nsamples, "seqlen": args.seqlen, "float32_weight_bytes": parameters * 4,
               "bf16_file_bytes": parameters * 2, "model_write_seconds": round(write_seconds, 1),
               "quantize_rc": result.get("rc"), "quantize_seconds": round(result.get("seconds", 0.0), 1),
               "quantize_peak_rss_bytes": result.get("peak_rss_bytes"),
               "peak_rss_vs_float32_weights": round(result.get("peak_rss_bytes", 0) / (parameters * 4), 3)}
        if result.get("rc") == 0 and Path(str(out) + ".json").is_file():
            summary = json.loads(Path(str(out) + ".json").read_text())
            row.update(bits_per_weight=summary["bits_per_weight"], size_bytes=summary["size_bytes"],
                       streamed=summary["streamed"], stage_seconds=summary["stage_seconds"])
        if args.generate and result.get("rc") == 0:
            generated = _measured(["generate", str(out), "The capital of France is", "--max-new-tokens", "8",
                                   "--no-chat"], log)
            row.update(generate_rc=generated.get("rc"), generate_peak_rss_bytes=generated.get("peak_rss_bytes"),
                       generate_seconds=round(generated.get("seconds", 0.0), 1))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
    else:
        main()
