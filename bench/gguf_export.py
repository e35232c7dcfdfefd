"""GGUF export measured in llama.cpp itself: the reference model quantized by a gguf-* method (llama.cpp's
block format rounded by LDLQ through the real Hessian), exported with `quipkit export`, and evaluated
by ik_llama.cpp (the `ik-llama-cpp-python` wheel, an optional bench dependency) on wt2-512x40; in the
same run, llama.cpp's own quantizer for the same type (llama-quantize on the source GGUF) and
quipkit's own evaluation of the same checkpoint (exported again with its bf16 embeddings as they are,
so that both engines see the same weights and should agree).

    python bench/gguf_export.py --types q4_0,iq4_nl [--work runs/gguf] [--nsamples 32] [--hessian-cache DIR]

One JSON line per type.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


# The ik-llama-cpp-python wheel returns wrong logits for batches of 32 tokens or more on this machine's
# CPU (every position, the first included; batches of up to 31 agree with transformers' GGUF reader to
# llama.cpp's usual 0.5 logit), so windows are fed in micro-batches of 16 with the KV cache between them.
SAFE_BATCH = 16
# llama-quantize's name for the file type closest to a gguf-* method (Q4_K alone means Q4_K_M there,
# which spends more bits on some layers; likewise Q3_K)
LLAMA_QUANTIZE_TYPE = {"q4_k": "Q4_K_S", "q3_k": "Q3_K_S"}


def llama_cpp_perplexity(path: Path, windows: np.ndarray, threads: int = 2) -> float:
    """exp(mean NLL) of every token after the first of each window [count, T], as ik_llama.cpp computes
    the logits (the same token ids quipkit evaluates)."""
    from ik_llama_cpp import IkLlama
    from ik_llama_cpp import _ctypes_api as api

    length = windows.shape[1]
    llm = IkLlama(str(path), n_ctx=length, n_threads=threads, verbose=False)
    ctx, vocab, step = llm.ctx, llm._model.n_vocab, min(SAFE_BATCH, llm._context._n_ubatch)
    total, scored = 0.0, 0
    for window in windows:
        llm._context.kv_cache_clear()
        for start in range(0, length, step):  # a micro-batch at a time, its logits read before the next
            chunk = window[start : start + step].tolist()
            batch = api.llama_batch_init(len(chunk), 0, 1)
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, start + i, 1, 1
                batch.seq_id[i][0] = 0
            failed = llm._context.decode(batch)
            api.llama_batch_free(batch)
            if failed:
                raise RuntimeError(f"llama_decode failed on {path}")
            for i in range(len(chunk)):
                position = start + i
                if position + 1 >= length:
                    break
                pointer = api.llama_get_logits_ith(ctx, i)
                logits = np.ctypeslib.as_array(pointer, shape=(vocab,)).astype(np.float64)
                peak = logits.max()
                total += peak + np.log(np.exp(logits - peak).sum()) - logits[window[position + 1]]
                scored += 1
    llm.close()
    return float(np.exp(total / scored))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q4_0,iq4_nl", help="comma-separated: q4_0, q4_1, q8_0, iq4_nl, q4_k, q3_k, q2_k")
    parser.add_argument("--work", default="runs/gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows of quipkit's rounding [128]")
    parser.add_argument("--hessian-cache", help="share calibration Hessians with other runs (quipkit quantize --hessian-cache)")
    args = parser.parse_args()

    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from peer_ik import make_gguf

    import quipkit
    from quipkit.eval.perplexity import PROTOCOLS, perplexity, protocol_windows
    from quipkit.models.loading import default_gguf, load_tokenizer

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    source = default_gguf()
    source_file = Path(source.location) / source.gguf_file
    proto = PROTOCOLS["wt2-512x40"]
    windows = protocol_windows(load_tokenizer(source), proto).numpy()
    for kind in args.types.split(","):
        folder, exported, held = work / kind, work / f"quipkit-{kind}.gguf", work / f"quipkit-{kind}-bf16-embeddings.gguf"
        start = time.perf_counter()
        if not (folder / "config.json").is_file():  # kept between runs (an interrupted one resumes)
            subprocess.run([sys.executable, "-m", "quipkit.cli", "quantize", str(source_file), "--method",
                            f"gguf-{kind}", "--out", str(folder), "--no-check", "--nsamples", str(args.nsamples)]
                           + (["--hessian-cache", args.hessian_cache] if args.hessian_cache else []), check=True)
        quantize_seconds = time.perf_counter() - start
        for path, embeddings in ((exported, "q8_0"), (held, "bf16")):
            subprocess.run([sys.executable, "-m", "quipkit.cli", "export", str(folder), "--out", str(path),
                            "--overwrite", "--embeddings", embeddings], check=True)
        model, tokenizer = quipkit.load(folder)
        ours_in_quipkit = perplexity(model, tokenizer, proto, torch.device("cpu"))["perplexity"]
        del model
        ours_in_llama = llama_cpp_perplexity(exported, windows, args.threads)
        same_weights_in_llama = llama_cpp_perplexity(held, windows, args.threads)
        theirs = make_gguf(source_file, LLAMA_QUANTIZE_TYPE.get(kind, kind.upper()), work, None)
        theirs_in_llama = llama_cpp_perplexity(theirs, windows, args.threads)
        print(json.dumps({"bench": "gguf_export", "type": kind, "protocol": proto.name, "nsamples": args.nsamples,
                          "quipkit_ldlq_in_llama_cpp": ours_in_llama,
                          "quipkit_ldlq_bf16_embeddings_in_llama_cpp": same_weights_in_llama,
                          "quipkit_ldlq_bf16_embeddings_in_quipkit": ours_in_quipkit,
                          "llama_quantize_in_llama_cpp": theirs_in_llama,
                          "quipkit_file_bytes": exported.stat().st_size, "llama_quantize_file_bytes": theirs.stat().st_size,
                          "quantize_seconds": round(quantize_seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
