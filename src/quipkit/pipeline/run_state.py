"""On-disk state of an unfinished run, so an interrupted quantization resumes where it stopped.

After block k the run writes, into a work folder (`OUT.partial/`), that block's tensors as they go
into the checkpoint (`block_k`, final names and storage dtypes: a shard of the result), then block
k+1's inputs under their own name (`inputs_k+1`), and only then `state.json`, which says "k+1 blocks
done" and holds the quantized layers' specs: the commit point. Each file is written to a temporary name and renamed,
and no file is ever overwritten with other contents, so a crash between any two writes leaves the
previous state whole (files of the uncommitted block are stale and removed on the next open).
Running the same command again restores the finished blocks and continues bit-identically; a run
with other settings refuses to mix with it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import Tensor

from quipkit.errors import QuipkitError
from quipkit.faults import reach
from quipkit.formats.atomic import atomic_save_tensors, atomic_write_text, link_or_copy
from quipkit.pipeline.activations import ActivationFolder, OffloadedBatches

_STATE = "state.json"


class RunState:
    """The work folder of one run, identified by a fingerprint of everything that shapes the result."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = folder
        self.fingerprint = fingerprint
        self.next_block = 0
        self.records: list[dict[str, Any]] = []
        self.specs: dict[str, dict[str, Any]] = {}  # {layer name: QuantizedLinear spec} of the finished blocks
        self.block_finetune: list[dict[str, Any]] = []  # the finished blocks' fine-tuning records

    @classmethod
    def open(cls, folder: Path, fingerprint: dict[str, Any], writer: bool = True) -> "RunState":
        """Resume the run in `folder` if it matches `fingerprint`, else start a new one there. Only the
        `writer` (the one process of a run that writes) creates the folder and cleans it up."""
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
            state.specs = dict(saved.get("specs") or {})
            state.block_finetune = list(saved.get("block_finetune") or [])
            if not state.inputs_file(state.next_block).is_file():
                raise QuipkitError(f"{folder} lacks {state.inputs_file(state.next_block).name}; delete {folder} to start over")
        elif writer:
            folder.mkdir(parents=True, exist_ok=True)
        if writer:
            state._remove_stale()
        return state

    def _remove_stale(self) -> None:
        """Files of a block that was written but not committed, and temporary files of a killed write."""
        keep = {self.inputs_file(self.next_block).name, _STATE} | {self.block_file(i).name for i in range(self.next_block)}
        batches = _batch_prefix(self.next_block)
        for path in self.folder.iterdir():
            if path.name not in keep and not (path.name.startswith(batches) and path.suffix == ".safetensors"):
                path.unlink(missing_ok=True)

    @property
    def resuming(self) -> bool:
        return self.next_block > 0

    def block_file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    def inputs_file(self, index: int) -> Path:
        """The inputs of block `index` (the outputs of block index - 1)."""
        return self.folder / f"inputs_{index:04d}.safetensors"

    def batch_file(self, index: int, batch: int) -> Path:
        """One batch of block `index`'s inputs, for a run whose activations are offloaded."""
        return self.folder / f"{_batch_prefix(index)}{batch:05d}.safetensors"

    def save_block(
        self,
        index: int,
        tensors: dict[str, Tensor],
        specs: dict[str, dict[str, Any]],
        records: list[dict[str, Any]],
        next_inputs: list[Tensor] | OffloadedBatches,
        extra: dict[str, Tensor] | None = None,
        finetune: dict[str, Any] | None = None,
    ) -> None:
        """Record block `index` as done: its checkpoint tensors {full name: tensor}, its quantized layers'
        specs, their records, the next block's inputs, `extra` tensors that travel with them, and its
        fine-tuning record.
        Offloaded inputs are linked into the folder one file per batch, never read into memory."""
        atomic_save_tensors(self.block_file(index), tensors, {"format": "pt"})
        reach("block-written")
        metadata = {"batches": str(len(next_inputs))}
        if isinstance(next_inputs, OffloadedBatches):
            for batch, path in enumerate(next_inputs.paths):
                link_or_copy(path, self.batch_file(index + 1, batch))
            batches, metadata["offloaded"] = {}, "1"
        else:
            batches = {f"batch_{i}": x for i, x in enumerate(next_inputs)}
        atomic_save_tensors(self.inputs_file(index + 1), {**batches, **(extra or {})}, metadata)
        reach("inputs-written")
        tuned = self.block_finetune + ([finetune] if finetune is not None else [])
        payload = {"fingerprint": self.fingerprint, "next_block": index + 1, "records": self.records + records,
                   "specs": {**self.specs, **specs}, "block_finetune": tuned}
        atomic_write_text(self.folder / _STATE, json.dumps(payload, indent=1))
        reach("state-written")
        self.next_block = index + 1
        self.records.extend(records)
        self.specs.update(specs)
        self.block_finetune = tuned
        self.inputs_file(index).unlink(missing_ok=True)
        for path in self.folder.glob(f"{_batch_prefix(index)}*.safetensors"):
            path.unlink(missing_ok=True)

    def load_block(self, index: int) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
        """(specs of its quantized layers, its tensors by full name) of finished block `index`."""
        _, tensors = self._read(self.block_file(index))
        modules = {key.rpartition(".")[0] for key in tensors}
        specs = {name: spec for name, spec in self.specs.items() if name in modules}
        return specs, tensors

    def load_inputs(self, space: ActivationFolder | None = None) -> tuple[list[Tensor] | OffloadedBatches, dict[str, Tensor]]:
        """(the next block's inputs, one tensor per calibration batch, in memory or, with `space`,
        offloaded there; the extra tensors stored with them). Either kind of run resumes either kind."""
        metadata, flat = self._read(self.inputs_file(self.next_block))
        count = int((metadata or {}).get("batches", "0"))
        if (metadata or {}).get("offloaded"):
            stored = OffloadedBatches([self.batch_file(self.next_block, i) for i in range(count)])
            missing = next((path for path in stored.paths if not path.is_file()), None)
            if missing is not None:
                raise QuipkitError(f"{self.folder} lacks {missing.name}; delete {self.folder} to start over")
        else:
            stored = [flat.pop(f"batch_{i}") for i in range(count)]
        if space is None:
            return (list(stored) if isinstance(stored, OffloadedBatches) else stored), flat
        inputs = space.batches()
        for batch in range(count):
            if isinstance(stored, OffloadedBatches):
                inputs.adopt(stored.paths[batch])
            else:
                inputs.append(stored[batch])
        return inputs, flat

    def block_files(self) -> list[Path]:
        """The finished blocks' files, in order."""
        return [self.block_file(i) for i in range(self.next_block)]

    def _read(self, path: Path) -> tuple[dict[str, str] | None, dict[str, Tensor]]:
        """(metadata, tensors) of one state file, or one line naming it and how to recover."""
        try:
            with safe_open(str(path), "pt") as handle:
                return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}
        except Exception as err:  # truncated or foreign: say which file and how to recover
            raise QuipkitError(f"{path} is unreadable ({str(err).splitlines()[0]}); delete {self.folder} to start over") from None

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _batch_prefix(index: int) -> str:
    """The start of the names of block `index`'s offloaded input batches."""
    return f"inputs_{index:04d}.batch_"


def fingerprint_of(**parts: Any) -> dict[str, Any]:
    """A JSON-normal form of the run's settings (round-tripped so comparisons are exact)."""
    return json.loads(json.dumps(parts, sort_keys=True, default=str))

