"""Stored tensors keep their formats when a model is cast.

`model.to(torch.bfloat16)` (or `.half()`) casts every floating buffer. For a quantized layer that
would turn fp16 scales and sign vectors into bf16 (three mantissa bits lost, for good) and hand the
kernels dtypes the codebook does not store. Moves still move them.
"""

from __future__ import annotations

from torch import nn


class KeepsStoredFormats(nn.Module):
    """A module whose buffers are stored formats: device moves apply to them, dtype casts do not."""

    def _apply(self, fn, recurse: bool = True):
        before = dict(self._buffers)
        result = super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers.get(name)
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)  # the original, not a cast back: no bits lost
        return result
