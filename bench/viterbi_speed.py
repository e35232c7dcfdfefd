"""Trellis encoder throughput: the compiled tail-biting Viterbi against the vectorised torch one.

    python bench/viterbi_speed.py [--L 16] [--bits 2] [--code 1mad] [--tiles 64] [--torch-tiles 4]

Both encode i.i.d. Gaussian 256-weight tiles in the same process (the torch version, written in the
style of the published reference: one batched tensor operation per trellis step); prints JSON with
tiles per second and the speed-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from common import machine
from quipkit import native
from quipkit.codebooks.trellis import code_values, viterbi_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--L", type=int, default=16)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--code", default="1mad")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--torch-tiles", type=int, default=4)
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the compiled helpers are not built; reinstall quipkit with a C compiler")
    table = code_values(args.code, args.L)
    x = torch.randn(args.tiles, 256, generator=torch.Generator().manual_seed(0)) * 0.98
    native.trellis_encode(x[:2], table, args.L, args.bits)  # warm up
    start = time.perf_counter()
    _, cost_c = native.trellis_encode(x, table, args.L, args.bits)
    compiled = args.tiles / (time.perf_counter() - start)
    start = time.perf_counter()
    _, cost_t = viterbi_torch(x[: args.torch_tiles], table, args.L, args.bits)
    reference = args.torch_tiles / (time.perf_counter() - start)
    agree = bool(torch.allclose(cost_c[: args.torch_tiles], cost_t, rtol=1e-4))
    print(json.dumps({
        "bench": "viterbi_speed", "L": args.L, "bits": args.bits, "code": args.code,
        "compiled_tiles_per_second": compiled, "torch_tiles_per_second": reference,
        "speedup": compiled / reference, "same_costs": agree, "threads": torch.get_num_threads(),
        "machine": machine(),
    }))


if __name__ == "__main__":
    main()
