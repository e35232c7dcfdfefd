"""lm-evaluation-harness adapter: run any harness task on a loaded (quantized) model.

The harness's HF model class accepts a model object, so a quipkit model runs through the very
code that produces published numbers. Task data comes from the harness's sources (the hub), so
this needs a connection, except for the bundled tasks: `quipkit_arc_easy`, `quipkit_piqa`, ... are
the harness's own task configs (prompts, metrics) pointed at the task files shipped with quipkit.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from quipkit.errors import QuipkitError, missing_dependency
from quipkit.eval.tasks import TASKS

BUNDLED_PREFIX = "quipkit_"


def require_harness() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise missing_dependency("lm-eval", "quipkit eval --harness")


def write_bundled_tasks(folder: Path) -> Path:
    """Write `quipkit_<task>` configs for the bundled tasks into `folder`: each includes the harness's
    config for that task and swaps its hub dataset for a local JSON file of the same schema."""
    import lm_eval.tasks
    import yaml

    harness_tasks = Path(lm_eval.tasks.__file__).parent
    for name, spec in TASKS.items():
        base = harness_tasks / spec.harness_yaml
        if not base.is_file():
            raise QuipkitError(f"this lm-eval has no {spec.harness_yaml}; install lm-eval>=0.4 (pip install 'quipkit[harness]')")
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in spec.rows()), encoding="utf-8")
        config = {
            "include": str(base),
            "task": BUNDLED_PREFIX + name,
            "tag": [],
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {spec.harness_split: str(data)}},
            "training_split": None,
            "validation_split": None,
            "test_split": None,
            f"{spec.harness_split}_split": spec.harness_split,  # the one split the harness evaluates
        }
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


@contextmanager
def harness_task_manager(tasks: list[str], include_path: str | None = None) -> Iterator[Any]:
    """The harness's TaskManager with the bundled tasks (their files live as long as the context)
    and `include_path`'s YAMLs; fails on an unknown task before any model is loaded."""
    require_harness()
    from lm_eval.tasks import TaskManager

    if include_path and not Path(include_path).is_dir():
        raise QuipkitError(f"--harness-include {include_path} is not a folder; pass the folder of your task YAMLs")
    with tempfile.TemporaryDirectory(prefix="quipkit-harness-") as tmp:
        manager = TaskManager(include_path=[str(write_bundled_tasks(Path(tmp)))] + ([include_path] if include_path else []))
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise QuipkitError(f"lm-evaluation-harness has no task {', '.join(unknown)}; offline, use one of "
                               + ", ".join(BUNDLED_PREFIX + name for name in TASKS))
        yield manager


def run_harness(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    manager: Any,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
) -> dict[str, Any]:
    """The harness's output for `model` on `tasks` of `manager` (see `harness_task_manager`):
    `results` per task, and `samples` when `log_samples`."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=manager, log_samples=log_samples)


def harness_metrics(results: dict[str, dict[str, Any]]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) from the harness's `{task: {"acc,none": .., "acc_stderr,none": ..}}`."""
    rows = []
    for name, metrics in results.items():
        for key, value in metrics.items():
            metric, _, filtered = key.partition(",")
            if filtered and not metric.endswith("_stderr") and isinstance(value, (int, float)):
                stderr = metrics.get(f"{metric}_stderr,{filtered}")
                rows.append((name, metric, float(value), stderr if isinstance(stderr, float) else None))
    return rows
