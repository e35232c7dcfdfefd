"""ICQuant's outlier index on the reference model's real weights: its bits per weight against the
entropy floor h(ratio), and how much of each row's range the outliers take.

    python bench/icquant_index.py [--ratios 0.02,0.05,0.08] [--model NAME]

For every linear layer of the decoder blocks, each row's `ratio` largest magnitudes are the outliers
(the icquant codebook's own choice); the positions are index-coded at the width that codes the whole
matrix in the fewest bits, counted as stored. Prints one JSON line per ratio: index bits per weight over all layers (and
the widths chosen), h(ratio), and the outliers' share of the row range, i.e. 1 - (inlier range /
whole range), averaged over rows: what a grid that covers only the inliers saves.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from common import machine
from quipkit.codebooks import outlier_positions
from quipkit.codebooks.icquant import OutlierSplitGrid
from quipkit.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.02,0.05,0.08")
    parser.add_argument("--model", default=None, help="model name or path [the reference model]")
    args = parser.parse_args()
    model, _, source = load_model(args.model)
    weights = {name: module.weight.detach() for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and ".layers." in name}
    for ratio in (float(r) for r in args.ratios.split(",")):
        bits = weights_total = 0
        widths: Counter = Counter()
        shares = []
        codebook = OutlierSplitGrid(2, ratio)
        for w in weights.values():
            mask = codebook.outlier_mask(w)
            width = outlier_positions.best_width(mask)
            widths[width] += 1
            stream, _ = outlier_positions.encode(mask, width)
            bits += (1 + stream.numel()) * 8  # as stored: the width byte, then the symbols
            weights_total += w.numel()
            whole = w.amax(1) - w.amin(1)
            inliers = torch.where(mask, -torch.inf, w).amax(1) - torch.where(mask, torch.inf, w).amin(1)
            shares.append(1 - inliers / whole)
        share = torch.cat(shares)
        print(json.dumps({"bench": "icquant_index", "model": str(source), "ratio": ratio, "layers": len(weights),
                          "index_bits_per_weight": bits / weights_total,
                          "entropy_floor": outlier_positions.entropy_bits(ratio),
                          "overhead_vs_floor": bits / weights_total / outlier_positions.entropy_bits(ratio) - 1,
                          "widths": dict(sorted(widths.items())),
                          "outlier_share_of_row_range": {"mean": float(share.mean()), "median": float(share.median()),
                                                         "p10": float(share.quantile(0.1)),
                                                         "p90": float(share.quantile(0.9))},
                          "machine": machine()}), flush=True)


if __name__ == "__main__":
    main()
