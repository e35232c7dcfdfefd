"""Incoherence transforms by name. Importing this package registers every built-in transform."""

from quipkit.transforms.base import TRANSFORMS, Params, Transform, make_transform, register_transform
from quipkit.transforms import kronecker, rht  # noqa: F401  (registers)

__all__ = ["TRANSFORMS", "Params", "Transform", "make_transform", "register_transform"]
