"""QuantizedLinear: a linear layer held as packed codes plus the transform that makes them incoherent.

forward(x) = transform.output(decode_matmul(x_t) + x_t R^T L^T) + bias with x_t = transform.input(x),
where decode_matmul is the kernel op (quipkit.kernels.ops) that takes the layer's stored tensors and
its codebook spec, and L R an optional low-rank term in a format of its own (CALDERA). The
module holds buffers only (codes, scales, sign vectors), named exactly as in the checkpoint, and its
constructor is the loading contract: `QuantizedLinear(**spec)` builds empty buffers of the right
shapes and dtypes.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from quipkit.codebooks import make_codebook
from quipkit.codebooks.low_rank import LEFT, RIGHT, ROW_SCALES, LowRank
from quipkit.kernels.dispatch import spec_of
from quipkit.kernels import cpu, dispatch
from quipkit.kernels.ops import decode_matmul, eager_call
from quipkit.layers.stored_formats import KeepsStoredFormats
from quipkit.transforms import make_transform

# The kernel spec of a held float32 weight (see keep_decoded).
DENSE_FLOAT32 = spec_of(make_codebook({"name": "dense", "bits": 32}))


class QuantizedLinear(KeepsStoredFormats):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        codebook: dict[str, Any],
        transform: dict[str, Any],
        bias: bool = False,
        low_rank: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.codebook = make_codebook(codebook)
        self.transform = make_transform(transform)
        self.low_rank = None if low_rank is None else LowRank(**low_rank)
        self.codebook.check_shape(out_features, in_features)
        parts = [self.codebook.storage(out_features, in_features), self.transform.storage(out_features, in_features)]
        if self.low_rank is not None:
            self.low_rank.check_shape(out_features, in_features)
            parts.append(self.low_rank.storage(out_features, in_features))
        self._codebook_names, self._transform_names = tuple(parts[0]), tuple(parts[1])
        self._low_rank_names = tuple(parts[2]) if self.low_rank is not None else ()
        if self.low_rank is not None:  # the term runs through the kernels as two decode-matmuls: x R^T, then L
            self._left_names, self._right_names = self.low_rank.names(out_features, in_features)
            self._low_rank_spec = spec_of(self.low_rank.codebook)
        layout = {name: kind for part in parts for name, kind in part.items()}
        if len(layout) != sum(len(part) for part in parts):
            raise ValueError("codebook, transform and low-rank tensor names collide")
        for name, (shape, dtype) in layout.items():  # filled by from_tensors or a state dict: untouched till then
            self.register_buffer(name, torch.empty(shape, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.register_buffer("decoded", None, persistent=False)  # see keep_decoded
        self.kernel_spec = spec_of(self.codebook)
        self._one_call: cpu.OneCallLinear | None | bool = False  # built on first use, see _fast_path

    def _fast_path(self) -> cpu.OneCallLinear | None:
        """The one-call CPU path for this layer as it is now placed, built once (moves reset it); none
        for a layer with a low-rank term, which the one call does not add."""
        if self._one_call is False and self.low_rank is not None:
            self._one_call = None
        elif self._one_call is False:
            vectors = (self._buffers.get("su"), self._buffers.get("sv"), self.bias) if self.transform.name == "rht" \
                else (None, None, self.bias)
            self._one_call = cpu.one_call_linear(self.codebook, self.out_features, self.in_features,
                                                 self.transform.name, self.codebook_tensors().values(), vectors)
        return self._one_call

    @property
    def qweight(self) -> Tensor:
        """The first stored codebook tensor: where libraries that wrap quantized layers (PEFT) look to
        place what they add on the layer's device."""
        return self._buffers[self._codebook_names[0]]

    def _apply(self, fn, recurse: bool = True):
        self._one_call = False  # device or dtype may change
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._one_call = False  # assign=True may bring tensors of other dtypes
        return super()._load_from_state_dict(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, Tensor) and name in self.__dict__.get("_buffers", ()):
            self.__dict__["_one_call"] = False  # a replaced buffer may differ in dtype or layout
        super().__setattr__(name, value)

    @classmethod
    def from_tensors(
        cls, spec: dict[str, Any], tensors: dict[str, Tensor], bias: Tensor | None = None
    ) -> "QuantizedLinear":
        """Build a layer from `spec` and fill its buffers from `tensors` (shapes and dtypes must match)."""
        layer = cls(**spec)
        for name in layer.stored_names():
            buf, value = getattr(layer, name), tensors[name]
            if value.shape != buf.shape:
                raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(buf.shape)}")
            setattr(layer, name, value.to(buf.dtype, copy=True))  # one copy (a bf16 head's is 200 MB)
        if layer.bias is not None:
            if bias is None:
                raise ValueError("the layer has a bias but none was given")
            layer.bias.data = bias.detach().float().clone()
        return layer

    def spec(self) -> dict[str, Any]:
        """The constructor arguments: what the checkpoint records for this layer."""
        spec = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "codebook": self.codebook.spec(),
            "transform": self.transform.spec(),
            "bias": self.bias is not None,
        }
        if self.low_rank is not None:
            spec["low_rank"] = self.low_rank.spec()
        return spec

    def stored_names(self) -> tuple[str, ...]:
        """The names of every stored tensor (buffer): codes, low-rank factors, transform vectors."""
        return self._codebook_names + self._low_rank_names + self._transform_names

    def stored_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.stored_names()}

    def codebook_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._codebook_names}

    def kernel_inputs(self) -> tuple[list[Tensor], str]:
        """(tensors, spec) for the decode_matmul op: the stored codes, or the held dense weight."""
        if self.decoded is not None:
            return [self.decoded], DENSE_FLOAT32
        return [getattr(self, name) for name in self._codebook_names], self.kernel_spec

    def transform_params(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self._transform_names}

    def low_rank_factors(self) -> tuple[Tensor, Tensor]:
        """(L [out, k], R [k, in]) of the low-rank term, decoded (float32); the layer must have one."""
        stored = {name: getattr(self, name) for name in self._low_rank_names}
        return self.low_rank.factors(stored, self.out_features, self.in_features)

    def stored_bits(self) -> int:
        """Bits this layer stores: codes, scales, low-rank factors and transform vectors (bias excluded)."""
        return sum(buf.numel() * buf.element_size() * 8 for buf in self.stored_tensors().values())

    @torch.no_grad()
    def keep_decoded(self, keep: bool = True) -> None:
        """Hold the dense rotated weight between calls (4 bytes per weight, never saved).

        Evaluation runs thousands of forwards, and decoding every time (trellis walks, codebook
        lookups) costs more than the matmul; generation on a small device wants the codes only.
        """
        self.decoded = None
        if keep:
            self.decoded = self.codebook.dequantize(self.codebook_tensors(), self.out_features, self.in_features)
            if self.low_rank is not None:
                left, right = self.low_rank_factors()
                self.decoded.addmm_(left, right)

    def forward(self, x: Tensor) -> Tensor:
        fast = self._one_call if self._one_call is not False else self._fast_path()
        if fast is not None and self.decoded is None and fast.applies(x) and eager_call(x) and not dispatch.REFERENCE_ONLY:
            buffers = self._buffers
            return fast(x, [buffers[n] for n in self._codebook_names], buffers.get("su"), buffers.get("sv"), self.bias)
        params = self.transform_params()
        x = self.transform.input(x, params)
        tensors, spec = self.kernel_inputs()
        y = decode_matmul(x, tensors, spec, self.out_features, self.in_features)
        if self.low_rank is not None and self.decoded is None:  # a held weight has it added already
            y = y + self._low_rank_term(x)
        y = self.transform.output(y, params)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def bound_one_row_call(self) -> Callable[[Tensor], Tensor] | None:
        """forward for one activation row x [1, in] (float32, contiguous, CPU) with this layer's tensors
        fixed (cpu.OneCallLinear.bound), for a decode loop in which the layer does not change; None
        where the one-call path does not apply."""
        fast = self._one_call if self._one_call is not False else self._fast_path()
        if fast is None or self.decoded is not None or dispatch.REFERENCE_ONLY:
            return None
        buffers = self._buffers
        return fast.bound([buffers[n] for n in self._codebook_names], buffers.get("su"), buffers.get("sv"), self.bias)

    def _low_rank_term(self, x: Tensor) -> Tensor:
        """(x [..., in] R^T) L^T -> [..., out], each factor decoded by its codebook's kernel (never held)."""
        buffers, rank, spec = self._buffers, self.low_rank.rank, self._low_rank_spec
        inner = decode_matmul(x, [buffers[n] for n in self._right_names], spec, rank, self.in_features)
        if self.low_rank.row_scaled:
            inner = inner * buffers[RIGHT + ROW_SCALES].to(inner.dtype)
        y = decode_matmul(inner, [buffers[n] for n in self._left_names], spec, self.out_features, rank)
        return y * buffers[LEFT + ROW_SCALES].to(y.dtype) if self.low_rank.row_scaled else y

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The dense W [m, n] this layer computes (float32), for tests and diagnostics."""
        eye = torch.eye(self.in_features, device=next(self.buffers()).device)
        y = self.forward(eye)
        if self.bias is not None:
            y = y - self.bias
        return y.t().float()

    def extra_repr(self) -> str:
        cb = self.codebook.spec()
        low_rank = "" if self.low_rank is None else f", rank={self.low_rank.rank}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, codebook={cb['name']}, "
            f"bits={cb['bits']}, transform={self.transform.name}{low_rank}, bias={self.bias is not None}"
        )


def keep_decoded(model: nn.Module, keep: bool = True) -> int:
    """`QuantizedLinear.keep_decoded` on every quantized layer of `model`; returns the bytes now held."""
    held = 0
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.keep_decoded(keep)
            held += module.decoded.numel() * 4 if keep else 0
    return held
