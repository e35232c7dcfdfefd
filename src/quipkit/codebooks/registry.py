"""Name -> Codebook class registry, so configs refer to codebooks by name."""

from __future__ import annotations

from typing import Any, Callable

from quipkit.errors import QuipkitError

CODEBOOKS: dict[str, type] = {}


def register_codebook(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        cls.name = name
        CODEBOOKS[name] = cls
        return cls

    return decorate


def make_codebook(spec: dict[str, Any]):
    """Build the codebook a spec like {"name": "e8p", "bits": 2} describes."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in CODEBOOKS:
        raise QuipkitError(f"unknown codebook '{name}'; known: {', '.join(sorted(CODEBOOKS))}")
    try:
        return CODEBOOKS[name](**spec)
    except TypeError as err:
        raise QuipkitError(f"bad parameters for codebook '{name}': {err}") from None
