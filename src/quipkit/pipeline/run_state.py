"""On-disk state of an unfinished run, so an interrupted quantization resumes where it stopped.

After each block the run writes that block's quantized layers and the next block's inputs into a
work folder (`OUT.partial/`), each file written to a temporary name and renamed, so a crash at any
moment leaves either the old or the new state, never half of one. Running the same command again
restores the finished blocks and continues; a run with other settings refuses to mix with it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from quipkit.errors import QuipkitError

_STATE = "state.json"
_ACTIVATIONS = "activations.safetensors"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class RunState:
    """The work folder of one run, identified by a fingerprint of everything that shapes the result."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.next_block = 0
        self.records: list[dict[str, Any]] = []

    @classmethod
    def open(cls, folder: Path, fingerprint: dict[str, Any]) -> "RunState":
        """Resume the run in `folder` if it matches `fingerprint`, else start a new one there."""
        state = cls(folder, fingerprint)
        path = folder / _STATE
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                raise QuipkitError(f"{path} is corrupt; delete {folder} to start over") from None
            if saved.get("fingerprint") != fingerprint:
                raise QuipkitError(
                    f"{folder} holds an unfinished run with different settings; "
                    "rerun with the same settings to resume it, or delete the folder to start over"
                )
            state.next_block = int(saved["next_block"])
            state.records = list(saved["records"])
        else:
            folder.mkdir(parents=True, exist_ok=True)
        return state

    @property
    def resuming(self) -> bool:
        return self.next_block > 0

    def block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def save_block(
        self,
        index: int,
        layers: dict[str, tuple[dict[str, Any], dict[str, Tensor]]],
        records: list[dict[str, Any]],
        next_inputs: list[Tensor],
    ) -> None:
        """Record block `index` as done: its layers {name: (spec, tensors)} and the next block's inputs."""
        tensors = {f"{name}.{key}": value for name, (_, ts) in layers.items() for key, value in ts.items()}
        specs = {name: spec for name, (spec, _) in layers.items()}
        atomic_save_tensors(self.block_file(index), tensors, {"specs": json.dumps(specs)})
        atomic_save_tensors(self.folder / _ACTIVATIONS, {f"batch_{i}": x for i, x in enumerate(next_inputs)})
        self.next_block = index + 1
        self.records.extend(records)
        payload = {"fingerprint": self.fingerprint, "next_block": self.next_block, "records": self.records}
        atomic_write_text(self.folder / _STATE, json.dumps(payload, indent=1))

    def load_block(self, index: int) -> dict[str, tuple[dict[str, Any], dict[str, Tensor]]]:
        """The layers saved for block `index`: {name: (spec, tensors)}."""
        path = self.block_file(index)
        with safe_open(str(path), "pt") as handle:
            specs = json.loads(handle.metadata()["specs"])
        flat = load_file(str(path))
        return {
            name: (spec, {k[len(name) + 1 :]: v for k, v in flat.items() if k.startswith(name + ".")})
            for name, spec in specs.items()
        }

    def load_inputs(self) -> list[Tensor]:
        flat = load_file(str(self.folder / _ACTIVATIONS))
        return [flat[f"batch_{i}"] for i in range(len(flat))]

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def fingerprint_of(**parts: Any) -> dict[str, Any]:
    """A JSON-normal form of the run's settings (round-tripped so comparisons are exact)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))

