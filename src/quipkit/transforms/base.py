"""The Transform interface: incoherence processing as pure functions plus its online part.

A transform conjugates a layer by orthogonal matrices, `W~ = U W V^T`, `H~ = V H V^T`, which keeps
the proxy loss and makes weights look Gaussian. The input side (`V`) depends only on `n` and a seed,
so layers that read the same input share it and can be rounded together; the output side (`U`)
is per layer and carries the layer's scale in `sv`. At inference, `input` maps activations into
the rotated basis and `output` maps results back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from quipkit.errors import QuipkitError

Params = dict[str, Tensor]
TRANSFORMS: dict[str, type] = {}


def register_transform(name: str) -> Callable[[type], type]:
    def decorate(cls: type) -> type:
        cls.name = name
        TRANSFORMS[name] = cls
        return cls

    return decorate


def make_transform(spec: dict[str, Any]) -> "Transform":
    """Build the transform a spec like {"name": "rht"} describes."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in TRANSFORMS:
        raise QuipkitError(f"unknown transform '{name}'; known: {', '.join(sorted(TRANSFORMS))}")
    try:
        return TRANSFORMS[name](**spec)
    except TypeError as err:
        raise QuipkitError(f"bad parameters for transform '{name}': {err}") from None


class Transform(ABC):
    name: ClassVar[str]
    #: Whether the layer's output carries a per-layer scale vector `sv` (all but identity).
    scaled: ClassVar[bool] = True
    #: Whether `fit_input` looks at the Hessian (then even round-to-nearest needs calibration).
    uses_hessian: bool = False

    def spec(self) -> dict[str, Any]:
        return {"name": self.name}

    @abstractmethod
    def fit_input(self, hessian: Tensor, weights: list[Tensor], seed: int) -> Params:
        """Input-side parameters for `hessian` [n, n] and the weights [m_i, n] of the layers reading that
        input (a list: they are only stacked where a transform needs them so)."""

    @abstractmethod
    def fit_output(self, rows: int, seed: int) -> Params:
        """Output-side parameters of one layer with `rows` outputs (before its scale is folded in)."""

    @abstractmethod
    def weight(self, weight: Tensor, params: Params) -> Tensor:
        """W [m, n] -> W~ = U W V^T (the basis the codebook rounds in, unscaled)."""

    @abstractmethod
    def hessian(self, hessian: Tensor, params: Params, consume: bool = False) -> Tensor:
        """H [n, n] -> H~ = V H V^T; with `consume`, H's memory is reused or released as soon as it is read."""

    @abstractmethod
    def input(self, x: Tensor, params: Params) -> Tensor:
        """Activations x [..., n] -> V x (online, every forward)."""

    @abstractmethod
    def output(self, y: Tensor, params: Params) -> Tensor:
        """y~ [..., m] -> sv ⊙ U^T y~ (online, every forward)."""

    @abstractmethod
    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every parameter tensor for a rows x cols layer."""

    def fold_scale(self, params: Params, scale: float) -> Params:
        """Fold the layer's weight scale into its output vector `sv` (stored in fp16)."""
        out = dict(params)
        out["sv"] = (params["sv"].float() * scale).half()
        return out


@register_transform("identity")
class Identity(Transform):
    """No incoherence processing (GPTQ, RTN); the codebook must carry its own scales."""

    scaled = False

    def fit_input(self, hessian: Tensor, weights: list[Tensor], seed: int) -> Params:
        return {}

    def fit_output(self, rows: int, seed: int) -> Params:
        return {}

    def weight(self, weight: Tensor, params: Params) -> Tensor:
        return weight

    def hessian(self, hessian: Tensor, params: Params, consume: bool = False) -> Tensor:
        return hessian

    def input(self, x: Tensor, params: Params) -> Tensor:
        return x

    def output(self, y: Tensor, params: Params) -> Tensor:
        return y

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {}

    def fold_scale(self, params: Params, scale: float) -> Params:
        raise QuipkitError("this codebook needs a transform that can carry the layer's scale (rht or kronecker)")
