"""Decode and prefill speed of quantized models against float32, in the same process.

    python bench/decode_speed.py matrix [--shapes ref,7b] [--threads 1,2] [--repeats 15]
    python bench/decode_speed.py model --models runs/q2,runs/q4 [--threads 1,2] [--rounds 3] [--tokens 128]
        [--parts decode,prefill]
    python bench/decode_speed.py peer [--threads 1,2] [--types F32,Q4_0,IQ4_KT,IQ2_KT]   (needs ik-llama-cpp-python)

Each result is one JSON line. `matrix`: every codebook's fused decode-matvec against torch's float32
matvec on the same shape, alternating, median of repeats, and the effective GB/s of packed bytes read.
`model`: batch-1 greedy decoding (64-token prompt, --tokens new tokens) and a 512-token prefill of the
reference model in float32 and of every quantized folder, rounds alternating between models: CPU time
per token of the decoding thread with 1 thread, wall-clock tokens/s with more; through `quipkit
generate`'s loop and through transformers' `generate` on a model loaded with `from_pretrained`;
the bytes each model holds and its folder's size. A prefill's ratio is the median over forwards each
timed between two float32 forwards (their mean is its baseline): a shared core that slows down for a
second slows a pair, not one side of the comparison. `peer`: ik_llama.cpp on the same model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import machine

from quipkit.codebooks.trellis import ONE_MAD_INCREMENT, QTIP_INCREMENT
from quipkit.kernels.activations import has_integer_kernel, set_activations

REF_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
BIG_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]
CODEBOOKS = {
    "e8p-2": {"name": "e8p", "bits": 2},
    "rvq-3": {"name": "rvq", "bits": 3},
    "rvq-4": {"name": "rvq", "bits": 4},
    # the increment the qtip method writes; "-qtip": the paper's, as in checkpoints written before it
    **{f"trellis-1mad-{k}": {"name": "trellis", "bits": k, "L": 16, "code": "1mad", "increment": ONE_MAD_INCREMENT}
       for k in (2, 3, 4)},
    "trellis-1mad-2-qtip": {"name": "trellis", "bits": 2, "L": 16, "code": "1mad", "increment": QTIP_INCREMENT},
    "trellis-3inst-2": {"name": "trellis", "bits": 2, "L": 16, "code": "3inst"},
    "grid-2-g128": {"name": "scalar", "bits": 2, "group_size": 128},
    "grid-3-g128": {"name": "scalar", "bits": 3, "group_size": 128},
    "grid-4-g128": {"name": "scalar", "bits": 4, "group_size": 128},
    "grid-8-g128": {"name": "scalar", "bits": 8, "group_size": 128},
    "uniform-2": {"name": "uniform", "bits": 2},
    "uniform-4": {"name": "uniform", "bits": 4},
    "icquant-2-r5": {"name": "icquant", "bits": 2, "ratio": 0.05},
    "icquant-table-2-r5": {"name": "icquant", "bits": 2, "ratio": 0.05, "inliers": "table"},
    "bf16": {"name": "dense", "bits": 16},
}


def _emit(row: dict, out: str | None) -> None:
    line = json.dumps({**row, "machine": machine()})
    print(line, flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")


def _random_stored(codebook, rows: int, cols: int) -> tuple[object, list[torch.Tensor]]:
    """(codebook as packed, its stored tensors): random bytes where every value is a valid code, else
    (ICQuant's index code) the packed nearest rounding of a random weight."""
    from quipkit.codebooks import make_codebook

    gen = torch.Generator().manual_seed(rows * 7 + cols)
    if codebook.name == "icquant":
        weight = torch.randn(rows, cols, generator=gen)
        params = codebook.fit(weight)
        stored = codebook.pack(codebook.quantize(weight, params, torch.arange(cols))[0], params)
        codebook = make_codebook(codebook.packed_spec(stored))
        return codebook, [stored[name] for name in codebook.storage(rows, cols)]
    out = []
    for shape, dtype in codebook.storage(rows, cols).values():
        if dtype.is_floating_point:
            out.append((torch.randn(shape, generator=gen) * 0.05).to(dtype))
        elif dtype == torch.uint8:
            out.append(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
        else:
            out.append(torch.randint(-(2**15), 2**15, shape, generator=gen, dtype=torch.int16))
    return codebook, out


def _alternating(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of a() and of b(), called in turn."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def bench_matrix(args) -> None:
    from quipkit.codebooks import make_codebook
    from quipkit.kernels import cpu

    shapes = {"ref": REF_SHAPES, "7b": BIG_SHAPES}
    chosen = [s for key in args.shapes.split(",") for s in shapes[key]]
    names = list(CODEBOOKS) if args.codebooks == "all" else args.codebooks.split(",")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for rows, cols in chosen:
            weight = torch.randn(rows, cols)
            x = torch.randn(1, cols)
            repeats = args.repeats if rows * cols < 4e6 else max(5, args.repeats // 3)
            for name in names:
                codebook, stored = _random_stored(make_codebook(CODEBOOKS[name]), rows, cols)
                packed = sum(t.numel() * t.element_size() for t in stored)
                for kind in _kinds(args, codebook, cols):
                    set_activations(kind)
                    dense, fused = _alternating(lambda: torch.nn.functional.linear(x, weight),
                                                lambda: cpu.matvec(x, stored, codebook, rows, cols), repeats)
                    _emit({"bench": "decode_speed", "part": "matrix", "codebook": name, "shape": [rows, cols],
                           "activations": kind, "threads": threads, "tier": cpu.tier(), "float32_us": dense * 1e6,
                           "fused_us": fused * 1e6, "speedup": dense / fused, "packed_GBps": packed / fused / 1e9,
                           "float32_GBps": rows * cols * 4 / dense / 1e9, "repeats": repeats}, args.out)
                set_activations("float")


def _kinds(args, codebook, cols: int) -> list[str]:
    """The --activations settings that make a difference to this layer (int8 only where it rounds)."""
    return [k for k in args.activations.split(",") if k == "float" or has_integer_kernel(codebook, cols)]


def _prompt(tokenizer, length: int, offset: int = 0) -> torch.Tensor:
    from quipkit.corpora import wikitext2

    ids = tokenizer(wikitext2("validation")[offset: offset + 20 * length], return_tensors="pt")["input_ids"]
    return ids[:, :length]


def _lean_decode(model, ids, tokens: int, cpu_clock) -> tuple[float, float]:
    """(decoding-thread CPU seconds per token, wall tokens/s) of the lean loop, EOS ignored."""
    from quipkit.generation import generate

    clock = {}

    def mark(token: int) -> None:
        if "cpu" not in clock:  # the first token comes from the prefill: decoding starts now
            clock["cpu"], clock["wall"] = cpu_clock(), time.perf_counter()

    generate(model, ids, tokens, (), on_token=mark)
    cpu_seconds, wall = cpu_clock() - clock["cpu"], time.perf_counter() - clock["wall"]
    return cpu_seconds / (tokens - 1), (tokens - 1) / wall


def _hf_decode(model, ids, tokens: int, cpu_clock) -> tuple[float, float]:
    """The same through transformers' generate: the difference between `tokens` new tokens and one."""
    def run(n: int) -> tuple[float, float]:
        c, w = cpu_clock(), time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return cpu_clock() - c, time.perf_counter() - w

    c1, w1 = run(1)
    c, w = run(tokens)
    return max(c - c1, 1e-9) / (tokens - 1), (tokens - 1) / max(w - w1, 1e-9)


# Timed prefills of each quantized model per round, each between two float32 ones.
PREFILL_PAIRS = 3


def _prefill_seconds(model, ids) -> float:
    """Seconds of one forward over `ids` (the last position's logits only, as generation does)."""
    import inspect

    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    start = time.perf_counter()
    model(input_ids=ids, use_cache=False, **extra)
    return time.perf_counter() - start


def _prefill_pairs(reference, model, kind: str, ids, pairs: int) -> list[tuple[float, float]]:
    """(model's seconds, the mean of the float32 forwards just before and after it), `pairs` times."""
    set_activations(kind)
    _prefill_seconds(model, ids)  # untimed: the first forward of this many rows picks its kernels
    out = []
    for _ in range(pairs):
        set_activations("float")
        before = _prefill_seconds(reference, ids)
        set_activations(kind)
        seconds = _prefill_seconds(model, ids)
        set_activations("float")
        out.append((seconds, (before + _prefill_seconds(reference, ids)) / 2))
    return out


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix == ".safetensors")


@torch.no_grad()
def bench_model(args) -> None:
    from transformers import AutoModelForCausalLM

    import quipkit  # noqa: F401  (registers the quantization method with transformers)
    from quipkit.generation import model_bytes
    from quipkit.kernels.info import kernel_summary
    from quipkit.models.loading import load_model

    parts = args.parts.split(",")
    if set(parts) - {"decode", "prefill"}:
        raise SystemExit(f"--parts takes decode and/or prefill, not {args.parts!r}")
    reference, tokenizer, source = load_model(args.reference)
    models = {"float32": reference}
    kind_of = {"float32": "float"}  # each entry's activations setting: a folder+int8 entry is the folder's model
    sizes = {"float32": model_bytes(reference)}  # a float32 safetensors folder holds exactly these bytes
    for folder in [f for f in args.models.split(",") if f]:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for kind in args.activations.split(","):
            name = folder if kind == "float" else f"{folder}+{kind}"
            models[name], kind_of[name], sizes[name] = model, kind, _folder_bytes(Path(folder))
    held = {name: model_bytes(m) for name, m in models.items()}
    for name, model in models.items():
        _emit({"bench": "decode_speed", "part": "memory", "model": name, "model_bytes": held[name],
               "vs_float32": held[name] / held["float32"], "disk_bytes": sizes[name],
               "disk_vs_float32": sizes[name] / sizes["float32"], "kernels": kernel_summary(model)}, args.out)
    prompt = _prompt(tokenizer, 64)
    long_prompt = _prompt(tokenizer, 512, offset=5000)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        cpu_clock = time.thread_time if threads == 1 else time.process_time
        results: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for round_index in range(args.rounds):
            order = list(models)[round_index % len(models):] + list(models)[:round_index % len(models)]
            for name in order:
                model = models[name]
                set_activations(kind_of[name])
                if "decode" in parts:
                    results.setdefault((name, "quipkit"), []).append(_lean_decode(model, prompt, args.tokens, cpu_clock))
                    results.setdefault((name, "transformers"), []).append(
                        _hf_decode(model, prompt, args.tokens, cpu_clock))
                if "prefill" in parts and name != "float32":
                    results.setdefault((name, "prefill"), []).extend(
                        _prefill_pairs(reference, model, kind_of[name], long_prompt, PREFILL_PAIRS))
        if "decode" in parts:
            base_cpu = statistics.median(c for c, _ in results[("float32", "transformers")])
            base_rate = statistics.median(r for _, r in results[("float32", "transformers")])
        for (name, loop), runs in results.items():
            if loop == "prefill":
                ratios = [base / seconds for seconds, base in runs]
                tokens = long_prompt.shape[1]
                _emit({"bench": "decode_speed", "part": "prefill", "model": name, "threads": threads,
                       "prompt_tokens": tokens, "tokens_per_s": tokens / statistics.median(s for s, _ in runs),
                       "float32_tokens_per_s": tokens / statistics.median(b for _, b in runs),
                       "vs_float32": statistics.median(ratios), "vs_float32_range": [min(ratios), max(ratios)],
                       "pairs": len(runs)}, args.out)
                continue
            cpu_ms = statistics.median(c for c, _ in runs) * 1e3
            rate = statistics.median(r for _, r in runs)
            _emit({"bench": "decode_speed", "part": "decode", "model": name, "loop": loop, "threads": threads,
                   "new_tokens": args.tokens, "prompt_tokens": prompt.shape[1], "cpu_ms_per_token": cpu_ms,
                   "tokens_per_s": rate, "cpu_speedup_vs_float32_transformers": base_cpu * 1e3 / cpu_ms,
                   "wall_speedup_vs_float32_transformers": rate / base_rate, "rounds": args.rounds}, args.out)


def bench_peer(args) -> None:
    from peer_ik import bench_ik

    for row in bench_ik(args):
        _emit(row, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("matrix", "model", "peer"))
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts [1,2]")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    parser.add_argument("--shapes", default="ref,7b", help="matrix: ref (the reference model's), 7b, or both")
    parser.add_argument("--codebooks", default="all", help=f"matrix: comma-separated, of {', '.join(CODEBOOKS)}")
    parser.add_argument("--repeats", type=int, default=15, help="matrix: timed calls per kernel")
    parser.add_argument("--activations", default="float",
                        help="matrix, model: comma-separated settings to time, float and/or int8 [float]")
    parser.add_argument("--reference", default=None, help="model: the float model [smollm2-135m]")
    parser.add_argument("--models", default="", help="model: comma-separated quantized folders")
    parser.add_argument("--rounds", type=int, default=3, help="model: rounds over all models, alternating")
    parser.add_argument("--parts", default="decode,prefill",
                        help="model: what to time, decode and/or prefill (prefill alone: more rounds in the same time)")
    parser.add_argument("--tokens", type=int, default=128, help="model: new tokens per decode")
    parser.add_argument("--types", default="F32,Q4_0,IQ4_KT,IQ2_KT", help="peer: ik_llama.cpp types")
    parser.add_argument("--work", default="runs/peer", help="peer: folder for the converted GGUF files")
    parser.add_argument("--hessian-cache", default="runs/hcache",
                        help="peer: a quipkit Hessian cache of the reference model (the importance matrix of *_KT types)")
    args = parser.parse_args()
    {"matrix": bench_matrix, "model": bench_model, "peer": bench_peer}[args.part](args)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
