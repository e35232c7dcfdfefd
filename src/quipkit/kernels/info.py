"""Which kernels this machine runs, per codebook: what `quipkit info --kernels` and `generate --stats` show."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.kernels import cpu, dispatch
from quipkit.kernels.activations import activations

# One representative spec per kernel family, with a shape every codebook accepts.
FAMILIES = [
    {"name": "scalar", "bits": 4, "group_size": 128},
    {"name": "uniform", "bits": 2},
    {"name": "e8p", "bits": 2},
    {"name": "rvq", "bits": 4},
    {"name": "trellis", "bits": 2, "L": 16, "code": "1mad"},
    {"name": "trellis", "bits": 2, "L": 16, "code": "3inst"},
    {"name": "trellis", "bits": 2, "L": 16, "code": "hyb"},
    {"name": "trellis", "bits": 2, "L": 12, "code": "lut"},
    {"name": "icquant", "bits": 2, "index_bytes": 1},
    {"name": "icquant", "bits": 2, "inliers": "table", "index_bytes": 1},
    {"name": "dense", "bits": 16},
    {"name": "dense", "bits": 32},
]
PREFILL_ROWS = 512


def machine() -> dict:
    """The compiled extension's state: built or not, its instruction-set tier, threads."""
    return {
        "compiled_extension": native.available(),
        "tier": cpu.tier(),
        "reference_only": dispatch.REFERENCE_ONLY,
        "threads": torch.get_num_threads(),
        "activations": activations(),
        "integer_kernels": native.available() and native.module().integer_kernels(),
        "cuda": torch.cuda.is_available(),
    }


def kernel_rows(device: str = "cpu") -> list[dict]:
    """Per codebook family: the kernel for one activation row (decoding) and for a prefill."""
    rows = []
    for spec in FAMILIES:
        codebook = make_codebook(spec)
        label = "-".join(str(spec[k]) for k in ("name", "code", "inliers") if k in spec) + f" {spec['bits']}-bit"
        choices = [dispatch.select_kernel(torch.zeros(n, 256, device=device), codebook, 256, 256).name
                   for n in (1, PREFILL_ROWS)]
        rows.append({"codebook": label, "decode": choices[0], "prefill": choices[1]})
    rows.append({"codebook": "hadamard (rht)", "decode": dispatch.select_hadamard(torch.zeros(1, 576, device=device)).name,
                 "prefill": dispatch.select_hadamard(torch.zeros(PREFILL_ROWS, 576, device=device)).name})
    return rows


def kernel_summary(model: nn.Module) -> str:
    """'e8p: cpu-fused-matvec x210, dense: cpu-fused-matvec x1 (avx512)': the decode kernel of each layer."""
    from quipkit.layers.quantized_linear import QuantizedLinear

    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            device = module.codes.device if "codes" in module._buffers else next(module.buffers()).device
            x = torch.zeros(1, module.in_features, device=device)
            kernel = dispatch.select_kernel(x, module.codebook, module.out_features, module.in_features)
            counts[(module.codebook.name, kernel.name)] += 1
    if not counts:
        return "no quantized layers (float model)"
    tier = f" ({cpu.tier()})" if native.available() else " (no compiled extension)"
    return ", ".join(f"{codebook}: {kernel} x{n}" for (codebook, kernel), n in sorted(counts.items())) + tier
