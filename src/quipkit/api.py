"""The Python API: quantize a loaded model, save it, load it back."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quipkit.config import CalibrationConfig, QuantConfig
from quipkit.console import Reporter
from quipkit.formats.checkpoint import load, save
from quipkit.pipeline.blockwise import QuantizeReport, quantize_blockwise
from quipkit.pipeline.calibration import calibration_tokens
from quipkit.pipeline.finetune import FinetuneOptions

__all__ = ["quantize", "save", "load"]


def quantize(
    model: nn.Module,
    tokenizer,
    config: QuantConfig,
    calibration: CalibrationConfig | None = None,
    device: torch.device | str | None = None,
    reporter: Reporter | None = None,
    work_folder: str | Path | None = None,
    model_id: str = "",
    hessian_cache: str | Path | None = None,
    block_finetune: FinetuneOptions | None = None,
) -> QuantizeReport:
    """Quantize `model` in place with `config`, calibrating on `calibration` text.

    With `work_folder`, every finished block is saved there and an interrupted call resumes when
    called again with the same arguments. With `hessian_cache`, a folder shared between calls,
    methods whose Hessians come from the original model compute them once per model. With
    `block_finetune`, each block is fine-tuned after its rounding (pipeline/finetune.py).
    """
    from quipkit.models.loading import pick_device

    calibration = calibration or CalibrationConfig()
    tokens = calibration_tokens(tokenizer, calibration) if config.needs_calibration else torch.empty(0, 0)
    return quantize_blockwise(
        model,
        tokens,
        config,
        calibration,
        pick_device(str(device) if device is not None else None),
        reporter,
        Path(work_folder) if work_folder is not None else None,
        model_id,
        Path(hessian_cache) if hessian_cache is not None else None,
        block_finetune=block_finetune,
    )
