"""Tune E8P's data scale and RVQ's (data scale, residual scale) for minimum Gaussian MSE; prints JSON.

    python bench/tune_rvq.py [--samples 1048576]

The winners are the defaults in quipkit/codebooks/e8p.py (E8P_GAUSSIAN_RMS) and rvq.py (RVQ_SCALES).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from quipkit.codebooks import make_codebook


def mse(spec: dict, x: torch.Tensor) -> float:
    cb = make_codebook(spec)
    scaled = x * cb.target_rms  # the data RMS the codebook sees
    _, values = cb.quantize(scaled.reshape(-1, 8), {}, torch.arange(8))
    return float((values / cb.target_rms - x.reshape(-1, 8)).square().mean())


def mse_tiles(spec: dict, tiles: torch.Tensor) -> float:
    """MSE of trellis-coding 256-weight tiles [B, 256] (each tile one 16 x 16 block)."""
    cb = make_codebook(spec)
    block = (tiles * cb.target_rms).reshape(-1, 16, 16).permute(1, 0, 2).reshape(16, -1)
    _, values = cb.quantize(block, {}, torch.arange(block.shape[1]))
    return float((values / cb.target_rms - block / cb.target_rms).square().mean())


def _range_grid(bits: int) -> list[float]:
    centre = {2: 1.5, 3: 2.05, 4: 2.5}[bits]
    return [round(centre * f, 3) for f in (0.9, 0.95, 1.0, 1.05, 1.1, 1.2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="e8p,rvq,uniform,trellis")
    parser.add_argument("--tiles", type=int, default=512, help="trellis: 256-weight tiles per evaluation")
    args = parser.parse_args()
    only = set(args.only.split(","))
    x = torch.randn(args.samples // 8, 8, generator=torch.Generator().manual_seed(args.seed))
    start = time.perf_counter()
    results = []
    if "e8p" in only:
        e8p = [(rms, mse({"name": "e8p", "bits": 2, "rms": rms}, x)) for rms in (0.95, 0.99, 1.01, 1.03, 1.05, 1.07, 1.11)]
        best = min(e8p, key=lambda t: t[1])
        results.append({"codebook": "e8p", "bits": 2, "rms": best[0], "mse": best[1]})
    if "uniform" in only:
        for bits in (2, 3, 4):
            grid = [(r, mse({"name": "uniform", "bits": bits, "range": r}, x)) for r in _range_grid(bits)]
            best = min(grid, key=lambda t: t[1])
            results.append({"codebook": "uniform", "bits": bits, "range": best[0], "mse": best[1]})
    if "trellis" in only:
        tiles = x.reshape(-1, 256)[: args.tiles]
        for code in ("1mad", "3inst", "hyb"):
            grid = [(rms, mse_tiles({"name": "trellis", "bits": 2, "L": 16, "code": code, "rms": rms}, tiles))
                    for rms in (0.86, 0.92, 0.98, 1.04, 1.1, 1.16)]
            best = min(grid, key=lambda t: t[1])
            results.append({"codebook": "trellis", "code": code, "bits": 2, "L": 16, "rms": best[0], "mse": best[1],
                            "tiles": len(tiles)})
    for bits, r_grid in  ((3, (1.6, 1.7, 1.75, 1.8, 1.85, 1.9, 2.0)), (4, (3.3, 3.45, 3.6, 3.7, 3.8, 4.0))):
        if "rvq" not in only:
            continue
        grid = []
        for rms in (0.86, 0.9, 0.95, 1.0, 1.03):
            for r in r_grid:
                grid.append((rms, r, mse({"name": "rvq", "bits": bits, "rms": rms, "residual_scale": r}, x)))
        rms, r, value = min(grid, key=lambda t: t[2])
        results.append({"codebook": "rvq", "bits": bits, "rms": rms, "residual_scale": r, "mse": value})
    for row in results:
        row["samples"] = args.samples
        row["seconds"] = time.perf_counter() - start
        print(json.dumps({k: v for k, v in row.items() if k != "grid"}))


if __name__ == "__main__":
    main()
