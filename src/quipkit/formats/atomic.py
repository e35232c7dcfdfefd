"""Atomic writes: a file is written under a temporary name and renamed, so a crash leaves the old
file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from quipkit.faults import reach


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: several may write one file
    tmp.write_text(text)
    reach("tmp-written")
    os.replace(tmp, path)


def atomic_save_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # one per process: several may write one file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    reach("tmp-written")
    os.replace(tmp, path)


def link_or_copy(source: Path, target: Path) -> None:
    """`target` with `source`'s content: a hard link on one file system (no copy), else a copy renamed
    into place, so a crash never leaves half a file under the name."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
