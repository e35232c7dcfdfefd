"""lm-evaluation-harness adapter: run any harness task on a loaded (quantized) model.

The harness's HF model class accepts a model object, so a quipkit model runs through the very
code that produces published numbers. Task data comes from the harness's sources (the hub), so
this needs a connection unless a task's data is local (e.g. a task YAML with `dataset_path: json`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from torch import nn

from quipkit.errors import missing_dependency


def require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise missing_dependency("lm-eval", "quipkit eval --harness")


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    device: torch.device | str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
) -> dict[str, Any]:
    """The harness's per-task results for `model`; `include_path` adds a folder of task YAMLs."""
    require_harness()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    manager = TaskManager(include_path=include_path) if include_path else None
    output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager)
    return output["results"]
