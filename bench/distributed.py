"""One process against several on the reference model: the same checkpoint bytes, and the rounding's
wall time.

    python bench/distributed.py --methods rtn:4,gptq:4,quip#:2,qtip:2 --option L=12 --nsamples 32 --nproc 2

For each method, `quipkit quantize` runs with 1 process and with --nproc N processes, every process
on one thread (OMP_NUM_THREADS=1), and the bench prints one JSON line: the sha256 of each
model.safetensors, whether they are identical, and each run's rounding seconds (from its --json)
with their ratio. `--baseline-src DIR` also runs the same command with another checkout's `src`
(e.g. a git worktree of an earlier commit) in one process, to show a change left results alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(argv: list[str], out: Path, nproc: int, src: str | None, log: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if src is not None:
        env["PYTHONPATH"] = src
    command = [sys.executable, "-m", "quipkit.cli", *argv, "--out", str(out), "--json", f"{out}.json"]
    if nproc > 1:
        command += ["--nproc", str(nproc)]
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(command)}\n")
        handle.flush()
        done = subprocess.run(command, env=env, stdout=handle, stderr=handle)
    row = {"rc": done.returncode, "wall_seconds": round(time.perf_counter() - start, 1)}
    if done.returncode == 0:
        summary = json.loads(Path(f"{out}.json").read_text())
        row["rounding_seconds"] = round(summary["stage_seconds"]["rounding"], 1)
        row["sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
        row["quick_check"] = summary.get("check")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn:4,gptq:4,quip#:2,qtip:2")
    parser.add_argument("--option", action="append", default=[], help="METHOD-SPECIFIC=VALUE, e.g. L=12 (qtip)")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--baseline-src", help="another checkout's src folder to run in one process as well")
    parser.add_argument("--work", default=None, help="folder for the checkpoints [a temporary one]")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="quipkit-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "runs.log"
    options = [f"--{key.replace('_', '-')}={value}" for key, value in (o.split("=", 1) for o in args.option)]
    for spec in args.methods.split(","):
        method, bits = spec.split(":")
        extra = options if method == "qtip" else []
        argv = ["quantize", args.model, "--method", method, "--bits", bits, "--nsamples", str(args.nsamples),
                "--overwrite", *extra]
        name = f"{method.replace('#', 's')}{bits}"
        runs = {"1": _run(argv, work / f"{name}-1", 1, None, log),
                str(args.nproc): _run(argv, work / f"{name}-{args.nproc}", args.nproc, None, log)}
        if args.baseline_src:
            runs["baseline"] = _run(argv, work / f"{name}-baseline", 1, args.baseline_src, log)
        hashes = {key: run.get("sha256") for key, run in runs.items()}
        one, many = runs["1"], runs[str(args.nproc)]
        row = {"bench": "distributed", "model": args.model, "method": method, "bits": int(bits), "options": extra,
               "nsamples": args.nsamples, "nproc": args.nproc, "runs": runs,
               "identical": len(set(hashes.values())) == 1 and None not in hashes.values()}
        if one.get("rounding_seconds") and many.get("rounding_seconds"):
            row["rounding_ratio"] = round(many["rounding_seconds"] / one["rounding_seconds"], 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
