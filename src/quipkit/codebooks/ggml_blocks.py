"""llama.cpp's block formats (Q4_0, Q4_1, Q8_0, IQ4_NL, and the 256-wide k-quants Q4_K, Q3_K, Q2_K), as codebooks.

Each row is cut into blocks of 32 weights; a block holds an fp16 scale d (Q4_1 also an fp16 minimum
m) and one code per weight, and decodes to d * level[code] (+ m). The stored tensor is the blocks'
bytes exactly as GGML lays them out (scale first, then 4-bit codes with weight j in the low nibble of
byte j and weight j + 16 in its high nibble, or 8-bit codes), so a GGUF export copies it and stock
llama.cpp reads it. The scales are fit before rounding (llama.cpp's own formula, or with `clip` a
search around it under llama.cpp's importance weighting, with the Hessian's diagonal as the
importance matrix); LDLQ then rounds against the real Hessian, which is what llama.cpp's own
quantizers cannot do.

The k-quants group blocks (of 32 for Q4_K, 16 for Q3_K and Q2_K) into superblocks of 256 whose
block scales (and non-positive minima) are themselves small integer multiples of fp16 superblock
scales. A row whose length is not a multiple of 256 gets IQ4_NL instead (`for_columns`), as
llama-quantize does for Q3_K and Q2_K (for Q4_K it picks Q5_0; IQ4_NL keeps Q4_K's 4.5 bits).
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
    nonpositive_min: bool = False  # the minimum is clamped to <= 0 (k-quants store it as -dmin * m, m >= 0)
    block: int = BLOCK  # weights sharing a scale

    @property
    def block_bytes(self) -> int:
        return 2 * (2 if self.minimum else 1) + self.block * self.bits // 8


FORMATS = {
    "q4_0": BlockFormat(4, tuple(range(-8, 8)), False),
    "q4_1": BlockFormat(4, tuple(range(16)), True),
    "q8_0": BlockFormat(8, tuple(range(-128, 128)), False, magnitude=True),
    "iq4_nl": BlockFormat(4, (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), False),
}
SUPER = 256  # weights per k-quant superblock
K_FORMATS = {
    "q4_k": BlockFormat(4, tuple(range(16)), True, nonpositive_min=True),
    "q3_k": BlockFormat(3, tuple(range(-4, 4)), False, block=16),
    "q2_k": BlockFormat(2, tuple(range(4)), True, nonpositive_min=True, block=16),
}
SCALE_STEPS = {"q4_k": (63, False), "q3_k": (32, True), "q2_k": (15, False)}  # the blocks' multiples of d (and dmin)
SUPER_BYTES = {"q4_k": 144, "q3_k": 110, "q2_k": 84}
# Rows not in 256s get a 32-block format: for Q4_K the same 4.5 bits per weight; for Q3_K and Q2_K
# IQ4_NL too, as llama-quantize does (4.5 bits: no 32-block format has fewer than 4)
K_FALLBACK = {"q4_k": "iq4_nl", "q3_k": "iq4_nl", "q2_k": "iq4_nl"}


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
        blocks, weights = self._weighted_blocks(weight, importance)
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
        return self._best(blocks, weights, self._candidates(blocks, weights, base))

    def _weighted_blocks(self, weight: Tensor, importance: Tensor | None) -> tuple[Tensor, Tensor]:
        """The weight as blocks [rows, blocks, size] and each weight's importance in the same shape."""
        rows, cols = weight.shape
        size = self.format.block
        blocks = weight.float().reshape(rows, cols // size, size)
        weights = torch.sqrt(2 * blocks.square().mean(-1, keepdim=True) + blocks.square())
        if importance is not None:
            weights = weights * importance.float().to(weights.device).reshape(1, -1, size)
        return blocks, weights

    def _best(self, blocks: Tensor, weights: Tensor, candidates) -> Params:
        """Per block, the candidate parameters whose nearest rounding has the least weighted error."""
        best, best_err = None, None
        for params in candidates:
            err = (weights * (self._nearest(blocks, *self._broadcast(params, lambda v: v.unsqueeze(-1)))[1]
                              - blocks).square()).sum(-1)
            if best is None:
                best, best_err = params, err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = {key: torch.where(better, params[key], best[key]) for key in best}
        return best

    def refit(self, codes: Tensor, params: Params, weight: Tensor, hessian: Tensor) -> Params:
        """Each row's block scales (and minima) solved for its codes by least squares through the Hessian:
        the values are linear in them, so min (w - v) H (w - v)^T is one small linear system per row
        (blocks x blocks, twice that with minima). Kept, in fp16, for the rows where it lowers that loss."""
        if not self.clip:
            return params
        rows, cols = weight.shape
        size, blocks = self.format.block, cols // self.format.block
        h = hessian.float()
        h_blocks = h.reshape(blocks, size, blocks, size)
        ones = h_blocks.sum(-1)  # [blocks, size, blocks]: H times each block's indicator
        out = {key: value.clone() for key, value in params.items()}
        step = max(1, (1 << 25) // (cols * blocks))  # rows at a time: the [rows, n, blocks] products stay ~128 MB
        for r0 in range(0, rows, step):
            part = slice(r0, min(rows, r0 + step))
            w = weight[part].float()
            q = self.levels(codes[part]).reshape(-1, blocks, size)
            hq = torch.einsum("bicj,rcj->rbic", h_blocks, q)  # [r, blocks, size, blocks]: H's block rows times q
            wh = (w @ h).reshape(-1, blocks, size)
            system = torch.einsum("rbi,rbic->rbc", q, hq)  # [r, blocks, blocks]
            rhs = (q * wh).sum(-1)
            if self.format.minimum:
                cross = torch.einsum("rbi,bic->rbc", q, ones)  # scale of block b against minimum of block c
                system = torch.cat([torch.cat([system, cross], 2),
                                    torch.cat([cross.transpose(1, 2), ones.sum(1).expand(len(q), -1, -1)], 2)], 1)
                rhs = torch.cat([rhs, wh.sum(-1)], 1)
            system = system.double()
            ridge = 1e-9 * system.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30)
            solved = torch.linalg.solve(system + ridge[:, None, None] * torch.eye(system.shape[1], dtype=system.dtype),
                                        rhs.double()).float().half().float()
            candidate = {"scale": solved[:, :blocks], **({"min": solved[:, blocks:]} if self.format.minimum else {})}
            old = {key: params[key][part] for key in candidate}
            better = self._row_loss(w, codes[part], candidate, h) < self._row_loss(w, codes[part], old, h)
            for key in candidate:
                out[key][part] = torch.where(better[:, None], candidate[key], old[key])
        return out

    def _row_loss(self, w: Tensor, codes: Tensor, params: Params, h: Tensor) -> Tensor:
        """(w - v) H (w - v)^T per row [r] for the values v the codes decode to with `params`."""
        error = w - self.decode(codes, params)
        return ((error @ h) * error).sum(1)

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

    def levels(self, codes: Tensor) -> Tensor:
        """The integer level each code stands for, as float32 (same shape as `codes`)."""
        return self._levels.to(codes.device)[codes.long()]

    def _value(self, codes: Tensor, scale: Tensor, shift: Tensor | float) -> Tensor:
        """d * level[code] (+ m): the same arithmetic as llama.cpp's dequantization."""
        value = scale * self._levels.to(scale.device)[codes]
        return value + shift if self.format.minimum else value

    def quantize(self, block: Tensor, params: Params, cols: Tensor) -> tuple[Tensor, Tensor]:
        group = cols // self.format.block
        return self._nearest(block, *self._broadcast(params, lambda v: v[:, group]))

    def decode(self, codes: Tensor, params: Params) -> Tensor:
        group = torch.arange(codes.shape[1], device=codes.device) // self.format.block
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
    """llama.cpp's k-quants: per row, superblocks of 256 weights, each cut into blocks (8 of 32 for
    Q4_K, 16 of 16 for Q3_K and Q2_K) whose scales (and minima) are integer multiples of fp16
    superblock scales d (and dmin): Q4_K (d * sc) * code - dmin * m with 6-bit sc, m (144 bytes per
    superblock); Q3_K (d * s) * level with signed 6-bit s, levels -4..3 (110 bytes); Q2_K like Q4_K
    with 4-bit sc, m and 2-bit codes (84 bytes)."""

    formats = K_FORMATS
    span = SUPER

    def for_columns(self, cols: int) -> Codebook:
        return self if cols % SUPER == 0 else GgmlBlocks(K_FALLBACK[self.type], self.clip)

    def refit(self, codes: Tensor, params: Params, weight: Tensor, hessian: Tensor) -> Params:
        return params  # the block scales are tied to the superblock's grid of multiples

    def fit(self, weight: Tensor, importance: Tensor | None = None) -> Params:
        """Each block's scale (and minimum) searched as for the 32-block formats, then put on the
        superblock's grid of multiples: d = largest scale / steps (Q3_K: the signed scale of largest
        magnitude / -32), dmin = largest -minimum / steps, both fp16; with `clip` each block then takes
        the best of the multiples next to its own (one below, nearest, one above; for the minimum too)."""
        rows, cols = weight.shape
        steps, signed = SCALE_STEPS[self.type]
        per_super = (rows, cols // SUPER, SUPER // self.format.block)
        free = super().fit(weight, importance)
        d, sc = _multiples(free["scale"].reshape(per_super), steps, signed)
        dmin, m = (_multiples((-free["min"]).clamp_min(0.0).reshape(per_super), steps, False)
                   if self.format.minimum else (None, None))

        low, high = _multiple_range(steps, signed)
        moves = (0, -1, 1) if self.clip else (0,)

        def candidates():
            # an fp16 unit times an integer below 64 is exact in float32: pack recovers the multiples
            for step in moves:
                for min_step in moves if self.format.minimum else (0,):
                    params = {"scale": (d.unsqueeze(-1) * (sc + step).clamp(low, high)).flatten(1)}
                    if self.format.minimum:
                        params["min"] = -(dmin.unsqueeze(-1) * (m + min_step).clamp(0, steps)).flatten(1)
                    yield params

        best = self._best(*self._weighted_blocks(weight, importance), candidates())
        return {**best, "d": d, **({"dmin": dmin} if self.format.minimum else {})}

    def pack(self, codes: Tensor, params: Params) -> dict[str, Tensor]:
        rows, cols = codes.shape
        per_super = (rows, cols // SUPER, SUPER // self.format.block)
        sc = _ratio(params["scale"].reshape(per_super), params["d"])
        m = _ratio(-params["min"].reshape(per_super), params["dmin"]) if self.format.minimum else None
        data = _LAYOUTS[self.type][0](codes.reshape(rows, -1, SUPER), sc, m, params["d"], params.get("dmin"))
        return {"blocks": data.to(torch.uint8).reshape(rows, -1)}

    def unpack(self, stored: dict[str, Tensor], rows: int, cols: int) -> tuple[Tensor, Params]:
        data = stored["blocks"].reshape(rows, cols // SUPER, SUPER_BYTES[self.type])
        codes, sc, m, d, dmin = _LAYOUTS[self.type][1](data)
        params = {"scale": (d.unsqueeze(-1) * sc).reshape(rows, -1), "d": d}
        if self.format.minimum:
            params.update({"min": -(dmin.unsqueeze(-1) * m).reshape(rows, -1), "dmin": dmin})
        return codes.reshape(rows, cols), params

    def storage(self, rows: int, cols: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {"blocks": ((rows, cols // SUPER * SUPER_BYTES[self.type]), torch.uint8)}


def _multiples(values: Tensor, steps: int, signed: bool) -> tuple[Tensor, Tensor]:
    """values [..., k] -> (unit [...] in fp16, multiples [..., k] as float): 0..steps of a unit that
    puts the largest value on `steps`, or (signed) -steps..steps-1 of one that puts the value of
    largest magnitude on -steps."""
    if signed:
        extreme = values.gather(-1, values.abs().argmax(-1, keepdim=True)).squeeze(-1)
        unit = (extreme / -steps).half().float()
    else:
        unit = (values.amax(-1) / steps).half().float()
    return unit, _ratio(values, unit).clamp(*_multiple_range(steps, signed))


def _multiple_range(steps: int, signed: bool) -> tuple[int, int]:
    return (-steps, steps - 1) if signed else (0, steps)


def _ratio(values: Tensor, unit: Tensor) -> Tensor:
    """values [..., k] / unit [...] rounded (0 where the unit is 0)."""
    unit = unit.unsqueeze(-1)
    return torch.where(unit != 0, values / torch.where(unit != 0, unit, 1.0), 0.0).round()


def _half_bytes(x: Tensor) -> Tensor:
    """fp16 values [...] -> their bytes [..., 2] as int32."""
    return x.half().unsqueeze(-1).view(torch.uint8).to(torch.int32)


def _half_from(data: Tensor) -> Tensor:
    """Bytes [..., 2] -> the fp16 values they hold, as float32 [...]."""
    return data.to(torch.uint8).contiguous().view(torch.float16).squeeze(-1).float()


def _crumbs(codes: Tensor) -> Tensor:
    """2-bit codes [..., 256] -> 64 bytes: byte 32 h + b holds weights 128 h + 32 j + b at bits 2 j."""
    c = codes.reshape(*codes.shape[:-1], 2, 4, 32)
    return (c[..., 0, :] | c[..., 1, :] << 2 | c[..., 2, :] << 4 | c[..., 3, :] << 6).reshape(*codes.shape[:-1], 64)


def _from_crumbs(data: Tensor) -> Tensor:
    d = data.reshape(*data.shape[:-1], 2, 1, 32)
    return ((d >> (2 * torch.arange(4).reshape(4, 1))) & 3).reshape(*data.shape[:-1], SUPER)


def _pack_q4_k(codes, sc, m, d, dmin):
    """d, dmin, 12 bytes of 6-bit sc and m (blocks 0-3 in the low 6 bits of bytes 0-3 (sc) and 4-7 (m);
    blocks 4-7's low 4 bits in bytes 8-11, sc low nibble and m high, their top 2 bits in the top bits
    of bytes 0-7), then codes: two blocks share 32 bytes, low and high nibble."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    scales = torch.cat([sc[..., :4] | (sc[..., 4:] >> 4) << 6, m[..., :4] | (m[..., 4:] >> 4) << 6,
                        (sc[..., 4:] & 15) | (m[..., 4:] & 15) << 4], -1)
    pairs = codes.reshape(*codes.shape[:-1], 4, 2, 32)
    nibbles = (pairs[..., 0, :] | pairs[..., 1, :] << 4).flatten(-2)
    return torch.cat([_half_bytes(d), _half_bytes(dmin), scales, nibbles], -1)


def _unpack_q4_k(data):
    data = data.to(torch.int32)
    low, mid, high = data[..., 4:8], data[..., 8:12], data[..., 12:16]
    sc = torch.cat([low & 63, (high & 15) | (low >> 6) << 4], -1)
    m = torch.cat([mid & 63, (high >> 4) | (mid >> 6) << 4], -1)
    nibbles = data[..., 16:].reshape(*data.shape[:-1], 4, 1, 32)
    codes = torch.cat([nibbles & 15, nibbles >> 4], -2).flatten(-3)
    return codes, sc, m, _half_from(data[..., 0:2]), _half_from(data[..., 2:4])


def _pack_q3_k(codes, sc, m, d, dmin):
    """32 bytes of high bits (weight 128 h + 32 j + b at bit 4 h + j of byte b), 64 bytes of low 2 bits,
    12 bytes of the 16 signed scales + 32 (low nibbles in bytes 0-7, scales 8-15 in the high halves;
    top 2 bits of scale 4 i + k at bits 2 i of byte 8 + k), then d."""
    codes = codes.to(torch.int32)
    high = (codes >> 2).reshape(*codes.shape[:-1], 8, 32) << torch.arange(8).reshape(8, 1)
    u = (sc + 32).to(torch.int32)
    tops = (u >> 4).reshape(*u.shape[:-1], 4, 4) << (2 * torch.arange(4).reshape(4, 1))
    scales = torch.cat([(u[..., :8] & 15) | (u[..., 8:] & 15) << 4, tops.sum(-2)], -1)
    return torch.cat([high.sum(-2), _crumbs(codes & 3), scales, _half_bytes(d)], -1)


def _unpack_q3_k(data):
    data = data.to(torch.int32)
    high = (data[..., :32].unsqueeze(-2) >> torch.arange(8).reshape(8, 1)) & 1  # [..., 8, 32]: (4 h + j, b)
    codes = _from_crumbs(data[..., 32:96]) | high.flatten(-2) << 2
    scales = data[..., 96:108]
    low = torch.cat([scales[..., :8] & 15, scales[..., :8] >> 4], -1)
    tops = (scales[..., 8:12].unsqueeze(-2) >> (2 * torch.arange(4).reshape(4, 1))) & 3  # [..., 4 i, k]
    return codes, (low | tops.flatten(-2) << 4) - 32, None, _half_from(data[..., 108:110]), None


def _pack_q2_k(codes, sc, m, d, dmin):
    """16 bytes of 4-bit scale (low nibble) and minimum (high), 64 bytes of 2-bit codes, then d, dmin."""
    scales = sc.to(torch.int32) | m.to(torch.int32) << 4
    return torch.cat([scales, _crumbs(codes.to(torch.int32)), _half_bytes(d), _half_bytes(dmin)], -1)


def _unpack_q2_k(data):
    data = data.to(torch.int32)
    scales = data[..., :16]
    return (_from_crumbs(data[..., 16:80]), scales & 15, scales >> 4, _half_from(data[..., 80:82]),
            _half_from(data[..., 82:84]))


_LAYOUTS = {"q4_k": (_pack_q4_k, _unpack_q4_k), "q3_k": (_pack_q3_k, _unpack_q3_k), "q2_k": (_pack_q2_k, _unpack_q2_k)}
