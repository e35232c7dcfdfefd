"""The eager decode-and-multiply: dequantize the whole weight, then one matmul. The test oracle."""

from __future__ import annotations

from torch import Tensor


def reference_matmul(x: Tensor, layer) -> Tensor:
    """x [..., n] (already in the layer's rotated basis) -> x @ Ŵ~^T [..., m]."""
    weight = layer.codebook.dequantize(layer.codebook_tensors(), layer.out_features, layer.in_features)
    return x @ weight.to(x.dtype).t()
