"""Shared by the bench scripts: the machine description every JSON result carries."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any, Callable

import torch


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def cached_targets(path: str | None, compute: Callable[[], Any]) -> Any:
    """The fine-tuning targets in `path` when it exists, else computed (and stored there when given):
    the float model's pass over the calibration text is minutes, the same for every method."""
    if path and Path(path).exists():
        return torch.load(path, weights_only=False)
    targets = compute()
    if path:
        torch.save(targets, path)
    return targets
