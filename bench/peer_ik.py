"""ik_llama.cpp (the `ik-llama-cpp-python` wheel, an optional bench dependency) on the reference model:
GGUF files of the requested types made with its own llama-quantize, then batch-1 greedy decoding
timed through its ctypes API, as bench/decode_speed.py times quipkit.

Its 2-bit trellis type needs an importance matrix; the wheel ships no llama-imatrix, so one is written
from a quipkit Hessian cache (`--hessian-cache`, what `quipkit quantize --hessian-cache` fills): the
diagonal of E[x x^T] of each linear's input is exactly what llama-imatrix accumulates.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import time
from pathlib import Path

# quipkit's linear names -> llama.cpp's tensor names
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _library_dir() -> Path:
    import ik_llama_cpp

    return Path(ik_llama_cpp.__file__).parent


def write_imatrix(hessian_folder: Path, out: Path, calls: int = 128) -> Path:
    """llama.cpp's legacy imatrix file (.dat) from a folder of quipkit block Hessians."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    entries = []
    for path in sorted(hessian_folder.glob("block_*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            groups = json.loads(handle.metadata()["groups"])
        tensors = load_file(str(path))
        for i, names in enumerate(groups):
            diagonal = tensors[f"h{i}"].diagonal().float()
            for name in names:
                block = name.split(".")[2]
                local = ".".join(name.split(".")[3:])
                entries.append((f"blk.{block}.{_GGUF_NAMES[local]}.weight", diagonal))
    with open(out, "wb") as handle:
        handle.write(struct.pack("<i", len(entries)))
        for name, diagonal in entries:
            encoded = name.encode()
            handle.write(struct.pack("<i", len(encoded)) + encoded)
            handle.write(struct.pack("<ii", calls, diagonal.numel()))
            handle.write((diagonal * calls).numpy().astype("<f4").tobytes())
        handle.write(struct.pack("<i", calls))
        handle.write(struct.pack("<i", 0))
    return out


def make_gguf(source: Path, kind: str, work: Path, imatrix: Path | None) -> Path:
    """`source` requantized to `kind` by ik_llama.cpp's llama-quantize (kept between runs)."""
    out = work / f"smollm2-{kind}.gguf"
    if out.is_file():
        return out
    binary = _library_dir() / "bin" / "llama-quantize"
    command = [str(binary), "--allow-requantize"]
    if imatrix is not None and kind.endswith("_KT"):
        command += ["--imatrix", str(imatrix)]
    command += [str(source), str(out), kind]
    env = {**os.environ, "LD_LIBRARY_PATH": str(_library_dir() / "lib")}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"llama-quantize {kind} failed: {result.stderr.strip().splitlines()[-1]}")
    return out


def _decode(llm, prompt: list[int], tokens: int, cpu_clock) -> tuple[float, float]:
    """(CPU seconds per decoded token, wall tokens/s): `tokens` new tokens against one, greedy."""
    def run(n: int) -> tuple[float, float]:
        c, w = cpu_clock(), time.perf_counter()
        llm.generate(prompt, max_tokens=n, temperature=0.0)
        return cpu_clock() - c, time.perf_counter() - w

    c1, w1 = run(1)
    c, w = run(tokens)
    return (c - c1) / (tokens - 1), (tokens - 1) / max(w - w1, 1e-9)


def bench_ik(args):
    """JSON rows: file size and decode speed of each type at each thread count."""
    import statistics

    from ik_llama_cpp import IkLlama

    from quipkit.models.loading import default_gguf

    source = default_gguf()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    kinds = args.types.split(",")
    imatrix = None
    if any(k.endswith("_KT") for k in kinds):
        caches = sorted(Path(args.hessian_cache).glob("*/block_0000.safetensors"))
        if not caches:
            raise SystemExit(f"no Hessian cache under {args.hessian_cache}: run quipkit quantize --hessian-cache first")
        imatrix = write_imatrix(caches[0].parent, work / "imatrix.dat")
    files = {kind: make_gguf(Path(source.location) / source.gguf_file, kind, work, imatrix) for kind in kinds}
    prompt_text = "The history of the city begins with a small settlement on the river, " * 6
    for threads in [int(t) for t in args.threads.split(",")]:
        cpu_clock = time.process_time
        for kind, path in files.items():
            llm = IkLlama(str(path), n_ctx=512, n_threads=threads, verbose=False)
            prompt = llm.tokenize(prompt_text)[:64]
            runs = [_decode(llm, prompt, args.tokens, cpu_clock) for _ in range(args.rounds)]
            yield {"bench": "decode_speed", "part": "peer", "engine": "ik_llama.cpp", "type": kind, "threads": threads,
                   "file_bytes": path.stat().st_size, "new_tokens": args.tokens, "prompt_tokens": len(prompt),
                   "cpu_ms_per_token": statistics.median(c for c, _ in runs) * 1e3,
                   "tokens_per_s": statistics.median(r for _, r in runs), "rounds": args.rounds}
            del llm
