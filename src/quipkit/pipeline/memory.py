"""How much memory a quantization run needs, said before it starts, and a clear stop when it cannot fit.

A streamed run holds one block's float32 weights, the calibration activations (inputs and outputs of
the block), the block's Hessians and the rounding's working copies of its largest layer; a run that
loads the whole model holds the whole model instead of one block. The Hessian term is an upper
bound (it counts a Hessian per linear where linears reading one input share one).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from quipkit.config import CalibrationConfig, QuantConfig
from quipkit.errors import QuipkitError

GB = 1e9


def available_bytes() -> int | None:
    """Memory the system can give without swapping (Linux's MemAvailable), or None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def estimate(model: nn.Module, blocks: nn.ModuleList, calibration: CalibrationConfig, config: QuantConfig,
             streamed: bool, offloaded: bool = False) -> dict[str, float]:
    """{part: bytes} of the run's peak: weights held, activations (one batch's in and out when they are
    offloaded), Hessians, rounding work space."""
    block_params = max(sum(p.numel() for p in block.parameters()) for block in blocks)
    linears = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    embeddings = model.get_input_embeddings()
    hidden = embeddings.embedding_dim if isinstance(embeddings, nn.Embedding) else 0
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for b in blocks for p in b.parameters())
    weights = block_params * 4 + outside * 4 if streamed else sum(p.numel() for p in model.parameters()) * 4
    calibrated = config.needs_calibration
    held = 2 if calibration.activations == "bfloat16" else 4
    sequences = min(calibration.batch_size, calibration.nsamples) if offloaded else calibration.nsamples
    activations = 2 * sequences * calibration.seqlen * hidden * held if calibrated else 0
    hessians = sum(m.in_features ** 2 * 8 for m in linears) if calibrated else 0
    largest = max(linears, key=lambda m: m.in_features * (m.out_features + m.in_features))
    rounding = 4 * largest.in_features * largest.out_features * 4  # copies of the weight being rounded
    if config.rounding != "nearest":  # the LDL factorisation's float32 work space
        rounding += 2 * largest.in_features ** 2 * 4
    return {"weights": weights, "activations": activations, "hessians": hessians, "rounding": rounding}


def check_memory(model: nn.Module, blocks: nn.ModuleList, calibration: CalibrationConfig, config: QuantConfig,
                 streamed: bool, offloaded: bool = False, available: int | None = None) -> str:
    """A line saying what the run will need; a QuipkitError naming the fix when it cannot fit."""
    parts = estimate(model, blocks, calibration, config, streamed, offloaded)
    total = sum(parts.values())
    detail = ", ".join(f"{name} {value / GB:.2f}" for name, value in parts.items())
    available = available_bytes() if available is None else available
    held = "one block and what lies outside the blocks" if streamed else "the whole model"
    line = f"memory: about {total / GB:.2f} GB at most ({detail} GB; {held} in float32)"
    if available is not None and total > available:
        raise QuipkitError(f"this run needs about {total / GB:.1f} GB ({detail} GB) but {available / GB:.1f} GB are "
                           "available; lower --nsamples or --seqlen (the activations and Hessians), pass "
                           "--offload-activations DIR (activations on disk) or --activations bfloat16 (half of them), "
                           "or quantize on a machine with more memory")
    return line + (f", {available / GB:.1f} GB available" if available is not None else "")
