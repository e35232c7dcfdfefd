"""llama.cpp's block formats (Q4_0, Q4_1, Q8_0, IQ4_NL, and the 256-wide Q4_K), as codebooks.

Each row is cut into blocks of 32 weights; a block holds an fp16 scale d (Q4_1 also an fp16 minimum
m) and one code per weight, and decodes to d * level[code] (+ m). The stored tensor is the blocks'
bytes exactly as GGML lays them out (scale first, then 4-bit codes with weight j in the low nibble of
byte j and weight j + 16 in its high nibble, or 8-bit codes), so a GGUF export copies it and stock
llama.cpp reads it. The scales are fit before rounding (llama.cpp's own formula, or with `clip` a
search around it under llama.cpp's importance weighting, with the Hessian's diagonal as the
importance matrix); LDLQ then rounds against the real Hessian, which is what llama.cpp's own
quantizers cannot do.

Q4_K groups eight such blocks (each with a scale and a non-positive minimum) into a superblock of
256 whose scales and minima are themselves 6-bit multiples of two fp16 superblock scales. A row whose
length is not a multiple of 256 gets IQ4_NL instead (`for_columns`): the same 4.5 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from quipkit.codebooks.base import Codebook, Params
from quipkit.codebooks.registry import register_codebook
from quipkit.codebooks.scalar import CLIP_SHRINKS
from quipkit.errors import QuipkitError

BLOCK = 32  # weights per block, along a row
STRETCHES = [1.1, 1.05]  # scales above llama.cpp's tried too: its extreme level need not hold the extreme weight


@dataclass(frozen=True)
class BlockFormat:
    bits: int  # bits per code
    levels: tuple[int, ...]  # the integer level each code decodes to, ascending
    minimum: bool  # an fp16 minimum per block (the levels then start at 0)
    # llama.cpp's scale: the block's largest magnitude onto the top level (Q8_0), or else its signed
    # extreme onto the end level of larger magnitude (Q4_0: -8, IQ4_NL: -127), so its sign is kept
    magnitude: bool = False
    nonpositive_min: bool = False  # the minimum is clamped to <= 0 (Q4_K stores it as -dmin * m, m >= 0)

    @property
    def block_bytes(self) -> int:
        return 2 * (2 if self.minimum else 1) + BLOCK * self.bits // 8


FORMATS = {
    "q4_0": BlockFormat(4, tuple(range(-8, 8)), False),
    "q4_1": BlockFormat(4, tuple(range(16)), True),
    "q8_0": BlockFormat(8, tuple(range(-128, 128)), False, magnitude=True),
    "iq4_nl": BlockFormat(4, (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), False),
}
SUPER = 256  # weights per k-quant superblock
SUPER_BLOCKS = SUPER // BLOCK
K_FORMATS = {"q4_k": BlockFormat(4, tuple(range(16)), True, nonpositive_min=True)}
K_FALLBACK = {"q4_k": "iq4_nl"}  # for rows not in 256s: a 32-block format of the same bits per weight


@register_codebook("ggml")
class GgmlBlocks(Codebook):
    """One of llama.cpp's 32-weight block formats (`type`: q4_0, q4_1, q8_0, iq4_nl)."""

    dim = 1
    formats = FORMATS
    span = BLOCK  # the row length must be a multiple of this

    def __init__(self, type: str, clip: bool = True) -> None:
        if type not in self.formats:
            raise QuipkitError(f"unknown llama.cpp block type '{type}'; choose one of {', '.join(self.formats)}")
        self.type, self.clip = type, clip
        self.format = self.formats[type]
        super().__init__(self.format.bits)
        self._levels = torch.tensor(self.format.levels, dtype=torch.float32)
        self._edges = (self._levels[1:] + self._levels[:-1]) / 2  # nearest level by bucketing

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "clip": self.clip}

    def check_shape(self, rows: int, cols: int) -> None:
        if cols % self.span:
            raise QuipkitError(f"llama.cpp's {self.type.upper()} needs in_features divisible by {self.span}; got a "
                               f"{rows}x{cols} weight (exclude the layer or pick another method)")

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """Per (row, block): llama.cpp's scale (and minimum), or with `clip` the best of its shrinks (and
        slight stretches), each also refit by weighted least squares to the codes it rounds to (scale
        formats), under llama.cpp's importance weights: `importance` x sqrt(2 mean(x^2) + x^2) per
        weight, so the columns the Hessian weighs most and the block's large weights count most."""
        rows, cols = weight.shape
        blocks = weight.float().reshape(rows, cols // BLOCK, BLOCK)
        weights = torch.sqrt(2 * blocks.square().mean(-1, keepdim=True) + blocks.square())  # [rows, blocks, BLOCK]
        if importance is not None:
            weights = weights * importance.float().to(weights.device).reshape(1, -1, BLOCK)
        low, high = self._levels[0].item(), self._levels[-1].item()
        if self.format.minimum:
            top, bottom = blocks.amax(-1), blocks.amin(-1)
            if self.format.nonpositive_min:
                bottom = bottom.clamp_max(0.0)
            base = {"scale": (top - bottom) / (high - low), "min": bottom}
        elif self.format.magnitude:
            base = {"scale": blocks.abs().amax(-1) / high}
        else:
            extreme = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True)).squeeze(-1)
            base = {"scale": extreme / (low if abs(low) >= abs(high) else high)}
        best, best_err = None, None
        for params in self._candidates(blocks, weights, base):
            err = (weights * (self._nearest(blocks, *self._broadcast(params, lambda v: v.unsqueeze(-1)))[1]
                              - blocks).square()).sum(-1)
            if best is None:
                best, best_err = params, err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {key: torch.where(better, params[key], best[key]) for key in best}
        return best

    def _candidates(self, blocks: Tensor, weights: Tensor, base: Params):
        """The parameters tried per block: llama.cpp's, and with `clip` its shrinks and stretches, each
        (scale formats) followed by the scale that fits its codes best by weighted least squares."""
        for shrink in STRETCHES + CLIP_SHRINKS if self.clip else [1.0]:
            params = {key: (value * shrink).half().float() for key, value in base.items()}
            yield params
            if self.clip and not self.format.minimum:
                codes = self._nearest(blocks, params["scale"].unsqueeze(-1), 0.0)[0]
                levels = self._levels.to(blocks.device)[codes]
                norm = (weights * levels.square()).sum(-1)
                fitted = (weights * blocks * levels).sum(-1) / norm.clamp_min(1e-30)
                yield {"scale": torch.where(norm > 0, fitted, params["scale"]).half().float()}

    def _broadcast(self, params: Params, spread) -> tuple[Tensor, Tensor | float]:
        """(scale, minimum or 0) of `params` per block, each passed through `spread` to line up with the weights."""
        return spread(params["scale"]), spread(params["min"]) if self.format.minimum else 0.0

    def _nearest(self, x: Tensor, scale: Tensor, shift: Tensor | float) -> tuple[Tensor, Tensor]:
        """Codes and values of the grid points nearest to x (`scale`, `shift` broadcast to x's shape)."""
        t = torch.where(scale == 0, 0.0, (x - shift) / torch.where(scale == 0, 1.0, scale))
        codes = torch.bucketize(t, self._edges.to(x.device))
        return codes.to(torch.int32), self._value(codes, scale, shift)

    def _value(self, codes: Tensor, scale: Tensor, shift: Tensor | float) -> Tensor:
        """d * level[code] (+ m): the same arithmetic as llama.cpp's dequantization."""
        value = scale * self._levels.to(scale.device)[codes]
        return value + shift if self.format.minimum else value

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        group = cols // BLOCK
        return self._nearest(block, *self._broadcast(params, lambda v: v[:, group]))

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        group = torch.arange(codes.shape[1], device=codes.device) // BLOCK
        return self._value(codes.long(), *self._broadcast(params, lambda v: v[:, group]))

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        rows, cols = codes.shape
        codes = codes.reshape(rows, cols // BLOCK, BLOCK)
        parts = [params["scale"].half().unsqueeze(-1).view(torch.uint8)]  # [rows, blocks, 2]
        if self.format.minimum:
            parts.append(params["min"].half().unsqueeze(-1).view(torch.uint8))
        if self.format.bits == 8:
            parts.append((codes - 128).to(torch.int8).view(torch.uint8))
        else:
            parts.append((codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)).to(torch.uint8))
        return {"blocks": torch.cat(parts, -1).reshape(rows, -1)}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        blocks = stored["blocks"].reshape(rows, cols // BLOCK, self.format.block_bytes)
        params = {"scale": blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()}
        start = 2
        if self.format.minimum:
            params["min"] = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
            start = 4
        data = blocks[..., start:]
        if self.format.bits == 8:
            codes = data.contiguous().view(torch.int8).to(torch.int32) + 128
        else:
            data = data.to(torch.int32)
            codes = torch.cat([data & 15, data >> 4], -1)
        return codes.reshape(rows, cols), params

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"blocks": ((rows, cols // BLOCK * self.format.block_bytes), torch.uint8)}


@register_codebook("ggml_k")
class GgmlSuperBlocks(GgmlBlocks):
    """llama.cpp's Q4_K: per row, superblocks of 256 weights, each eight 32-weight blocks decoding to
    (d * sc) * code - dmin * m with 6-bit sc, m per block and fp16 d, dmin per superblock (144 bytes:
    d, dmin, 12 bytes of packed sc and m, 128 bytes of codes)."""

    formats = K_FORMATS
    span = SUPER

    def for_columns(self, cols: int) -> Codebook:
        return self if cols % SUPER == 0 else GgmlBlocks(K_FALLBACK[self.type], self.clip)

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """Each block's scale and minimum as for Q4_1 (searched under the importance), then rounded to
        the superblock's 6-bit grids: d = largest scale / 63, dmin = largest -minimum / 63, in fp16."""
        rows, cols = weight.shape
        blocks = super().fit(weight, importance)
        scale = blocks["scale"].reshape(rows, cols // SUPER, SUPER_BLOCKS)
        lift = (-blocks["min"]).clamp_min(0.0).reshape(scale.shape)
        d = (scale.amax(-1) / 63).half().float()  # [rows, superblocks]
        dmin = (lift.amax(-1) / 63).half().float()
        sc, m = _six_bits(scale, d), _six_bits(lift, dmin)
        # d (fp16) times an integer below 64 is exact in float32: pack recovers sc and m exactly
        return {"scale": (d.unsqueeze(-1) * sc).reshape(rows, -1), "min": -(dmin.unsqueeze(-1) * m).reshape(rows, -1),
                "d": d, "dmin": dmin}

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        rows, cols = codes.shape
        supers = cols // SUPER
        d, dmin = params["d"], params["dmin"]
        sc = _six_bits(params["scale"].reshape(rows, supers, SUPER_BLOCKS), d).to(torch.int32)
        m = _six_bits(-params["min"].reshape(rows, supers, SUPER_BLOCKS), dmin).to(torch.int32)
        # blocks 0-3 in the low 6 bits of bytes 0-3 (sc) and 4-7 (m); blocks 4-7's low 4 bits in bytes
        # 8-11 (sc low nibble, m high nibble) and their top 2 bits in the top bits of bytes 0-7
        packed = torch.cat([sc[..., :4] | (sc[..., 4:] >> 4) << 6, m[..., :4] | (m[..., 4:] >> 4) << 6,
                            (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4], -1)
        pairs = codes.reshape(rows, supers, SUPER_BLOCKS // 2, 2, BLOCK)  # two blocks share 32 bytes: low, high nibble
        nibbles = (pairs[..., 0, :] | pairs[..., 1, :] << 4).reshape(rows, supers, SUPER // 2)
        parts = [d.half().unsqueeze(-1).view(torch.uint8), dmin.half().unsqueeze(-1).view(torch.uint8),
                 packed.to(torch.uint8), nibbles.to(torch.uint8)]
        return {"blocks": torch.cat(parts, -1).reshape(rows, -1)}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        supers = cols // SUPER
        blocks = stored["blocks"].reshape(rows, supers, self._super_bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        dmin = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
        packed = blocks[..., 4:16].to(torch.int32)
        low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
        sc = torch.cat([low & 63, (high & 15) | (low >> 6) << 4], -1)
        m = torch.cat([mid & 63, (high >> 4) | (mid >> 6) << 4], -1)
        data = blocks[..., 16:].to(torch.int32).reshape(rows, supers, SUPER_BLOCKS // 2, BLOCK)
        codes = torch.stack([data & 15, data >> 4], -2).reshape(rows, cols)
        params = {"scale": (d.unsqueeze(-1) * sc).reshape(rows, -1), "min": -(dmin.unsqueeze(-1) * m).reshape(rows, -1),
                  "d": d, "dmin": dmin}
        return codes, params

    @property
    def _super_bytes(self) -> int:
        return 4 + 12 + SUPER * self.format.bits // 8

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"blocks": ((rows, cols // SUPER * self._super_bytes), torch.uint8)}


def _six_bits(values: Tensor, unit: Tensor) -> Tensor:
    """values [..., k] as multiples 0..63 of unit [...] (0 where the unit is 0), as float."""
    unit = unit.unsqueeze(-1)
    return torch.where(unit > 0, values / torch.where(unit > 0, unit, 1.0), 0.0).round().clamp(0, 63)
