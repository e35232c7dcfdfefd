"""A folder of per-block Hessians, so quantizing one model at several methods or bit widths pays
for the calibration forward passes once.

Valid only where the Hessians do not depend on the method: inputs propagated from the original
model and no true-sequential updates. Keyed by a hash of the model and the calibration settings;
each block is one safetensors file, written atomically. A cache is used only when complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from quipkit.config import QuantConfig
from quipkit.errors import QuipkitError
from quipkit.formats.atomic import atomic_save_tensors, atomic_write_text

HessianGroups = list[tuple[list[str], Tensor]]  # [(linear names reading one input, E[x x^T] [n, n])]


def cacheable(config: QuantConfig) -> bool:
    """Whether `config`'s Hessians are the original model's, so a cache can serve them."""
    return config.needs_calibration and config.propagate == "original" and not config.sequential


def weight_signature(model: nn.Module) -> str:
    """A cheap fingerprint of the weights, so a cache never serves another model's Hessians."""
    parts = [f"{name}:{tuple(p.shape)}:{float(p.detach().float().abs().sum()):.6e}" for name, p in model.named_parameters()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


class HessianCache:
    """Hessians of one (model, calibration) pair under `root/<key>/block_NNNN.safetensors`, and the
    output head's (the original model's final hidden states) in `head.safetensors`; `head`: whether
    this run needs that one, so a cache without it is not complete."""

    def __init__(self, root: Path, identity: dict[str, Any], blocks: int, head: bool = False) -> None:
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.folder = Path(root) / key
        self.blocks, self.head = blocks, head
        self._head_file = self.folder / "head.safetensors"
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "identity.json", json.dumps(identity, sort_keys=True, indent=1, default=str))

    def _file(self, index: int) -> Path:
        return self.folder / f"block_{index:04d}.safetensors"

    @property
    def complete(self) -> bool:
        return all(self._file(i).is_file() for i in range(self.blocks)) and (self.has_head or not self.head)

    @property
    def has_head(self) -> bool:
        return self._head_file.is_file()

    def save_head(self, hessian: Tensor) -> None:
        """hessian [in, in] of the output head's input."""
        atomic_save_tensors(self._head_file, {"h": hessian.cpu()}, {})

    def load_head(self) -> Tensor:
        return self._read(self._head_file, lambda: load_file(str(self._head_file))["h"])

    def save(self, index: int, groups: HessianGroups) -> None:
        names = [group for group, _ in groups]
        tensors = {f"h{i}": hessian.cpu() for i, (_, hessian) in enumerate(groups)}
        atomic_save_tensors(self._file(index), tensors, {"groups": json.dumps(names)})

    def load(self, index: int) -> HessianGroups:
        path = self._file(index)

        def read() -> HessianGroups:
            with safe_open(str(path), "pt") as handle:
                names = json.loads(handle.metadata()["groups"])
            tensors = load_file(str(path))
            return [(group, tensors[f"h{i}"]) for i, group in enumerate(names)]

        return self._read(path, read)

    def _read(self, path: Path, read):
        """read(); a truncated or foreign file is named, with how to recover."""
        try:
            return read()
        except Exception as err:
            raise QuipkitError(f"Hessian cache file {path} is unreadable ({err}); delete {self.folder} and rerun") from None
