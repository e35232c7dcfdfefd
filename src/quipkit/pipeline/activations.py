"""Calibration activations kept on disk between uses (`--offload-activations DIR`).

A walk over the blocks holds every calibration batch's hidden states twice (a block's inputs and its
outputs); for a large model with many samples that is more than the block itself. Offloaded, each
batch is a safetensors file written once when it is produced and read back (into memory, one batch
at a time) each time a pass over the block needs it. Nothing in the result depends on where the
activations wait: an offloaded run writes the same bytes as one that holds them in memory.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from torch import Tensor

from quipkit.errors import QuipkitError
from quipkit.formats.atomic import atomic_save_tensors, link_or_copy
from quipkit.formats.streamed_file import dtype_named


def usable_folder(folder: Path) -> None:
    """Create `folder` (with its parents), or say in one line why the offload folder cannot be used."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise QuipkitError(f"--offload-activations cannot use {folder} ({err.strerror or err}); "
                           "pass a writable folder") from None


class ActivationFolder:
    """One run's folder under the user's offload directory; only the process that writes the result
    (`owner`) clears and removes it, the others add files under their own rank's names."""

    def __init__(self, root: Path, key: str, rank: int = 0, owner: bool = True) -> None:
        # the same run (same work folder) always gets the same folder, so a killed run's files are
        # cleared by the next one rather than left behind
        self.folder = Path(root) / f"quipkit-activations-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
        self.rank = rank
        self.owner = owner
        self._count = itertools.count()
        if owner:
            shutil.rmtree(self.folder, ignore_errors=True)
        usable_folder(self.folder)

    def batches(self) -> "OffloadedBatches":
        """A new, empty sequence of batches stored here."""
        return OffloadedBatches([], self)

    def next_path(self) -> Path:
        return self.folder / f"r{self.rank}-{next(self._count):06d}.safetensors"

    def remove(self) -> None:
        if self.owner:
            shutil.rmtree(self.folder, ignore_errors=True)


class OffloadedBatches(Sequence[Tensor]):
    """Hidden states of several batches, one file each, read when indexed or iterated; a slice is a
    view of the same files. Pickles as its paths, so processes on one machine can share it."""

    def __init__(self, paths: list[Path], folder: ActivationFolder | None = None) -> None:
        self.paths = list(paths)
        self.owner = folder  # where `append` writes (None: a view that is only read)

    def append(self, tensor: Tensor) -> None:
        if self.owner is None:
            raise TypeError("a view of offloaded activations is read-only")
        path = self.owner.next_path()
        atomic_save_tensors(path, {"hidden": tensor})
        self.paths.append(path)

    def adopt(self, path: Path) -> None:
        """Add the batch stored in file `path` (another folder's), linked where possible, else copied."""
        if self.owner is None:
            raise TypeError("a view of offloaded activations is read-only")
        target = self.owner.next_path()
        link_or_copy(path, target)
        self.paths.append(target)

    @property
    def dtype(self) -> torch.dtype:
        """The batches' dtype, from the first file's header (no data read)."""
        with safe_open(str(self.paths[0]), "pt") as handle:
            return dtype_named(handle.get_slice("hidden").get_dtype())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return OffloadedBatches(self.paths[index])
        with safe_open(str(self.paths[index]), "pt") as handle:
            return handle.get_tensor("hidden")

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.paths, self.owner = state["paths"], None

    def delete(self) -> None:
        """Remove the files (once no process reads them any more)."""
        for path in self.paths:
            path.unlink(missing_ok=True)

    @staticmethod
    def joined(parts: list["OffloadedBatches"]) -> "OffloadedBatches":
        """One view of several processes' batches, in order."""
        return OffloadedBatches([path for part in parts for path in part.paths])

