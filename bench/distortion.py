"""Gaussian distortion of every codebook at its best scale (MSE per coordinate of i.i.d. N(0,1) data).

    python bench/distortion.py [--samples 1048576] [--codebooks e8p,rvq3,rvq4,uniform2,...] [--sweep 0.97,1,1.03]

Prints one JSON object per codebook: mse at the best data scale of a sweep around the codebook's
default, the rate-distortion bound 2^(-2R) and the gap to it in dB.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from common import machine
from quipkit.codebooks import make_codebook

CODEBOOKS = {
    "uniform2": {"name": "uniform", "bits": 2},
    "uniform3": {"name": "uniform", "bits": 3},
    "uniform4": {"name": "uniform", "bits": 4},
    "e8p": {"name": "e8p", "bits": 2},
    "rvq3": {"name": "rvq", "bits": 3},
    "rvq4": {"name": "rvq", "bits": 4},
    **{f"trellis-{code}-{bits}": {"name": "trellis", "bits": bits, "L": 16, "code": code}
       for code in ("1mad", "3inst", "hyb") for bits in (2, 3, 4)},
}
SWEEP = (0.94, 0.97, 1.0, 1.03, 1.06)  # multiples of the default scale


def distortion(spec: dict, x: torch.Tensor, scale: float) -> float:
    """MSE per coordinate of quantizing x [N, dim] with the data scaled to `scale` x the codebook's RMS."""
    cb = make_codebook(spec)
    rms = (cb.target_rms or 1.0) * scale
    width = max(cb.dim, 64 - 64 % cb.dim)
    block = (x * rms).reshape(-1, width)
    if cb.row_block > 1:  # trellis tiles: 16 rows x 16 columns, i.e. 256 consecutive samples per tile
        block = (x * rms).reshape(-1, 16, 16).permute(1, 0, 2).reshape(16, -1)
        width = block.shape[1]
    _, values = cb.quantize(block, cb.fit(block), torch.arange(width))
    return float((values - block).square().mean()) / rms**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20)
    parser.add_argument("--codebooks", default=",".join(CODEBOOKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiles", type=int, default=4096, help="trellis codes: 256-weight sequences measured")
    parser.add_argument("--sweep", default=",".join(map(str, SWEEP)), help="data scales tried, as multiples of the default")
    args = parser.parse_args()
    x = torch.randn(args.samples // 64, 64, generator=torch.Generator().manual_seed(args.seed))
    for name in args.codebooks.split(","):
        spec = CODEBOOKS[name]
        start = time.perf_counter()
        data = x[: args.tiles * 4] if spec["name"] == "trellis" else x  # 4 rows of 64 = one 256 tile
        results = {s: distortion(spec, data, s) for s in map(float, args.sweep.split(","))}
        scale, mse = min(results.items(), key=lambda kv: kv[1])
        bound = 2.0 ** (-2 * spec["bits"])
        print(json.dumps({
            "bench": "distortion",
            "codebook": name,
            "spec": make_codebook(spec).spec(),
            "bits": spec["bits"],
            "mse": mse,
            "best_scale_factor": scale,
            "rate_distortion_bound": bound,
            "gap_db": 10 * math.log10(mse / bound),
            "samples": data.numel(),
            "seconds": time.perf_counter() - start,
            "machine": machine(),
        }))


if __name__ == "__main__":
    main()
