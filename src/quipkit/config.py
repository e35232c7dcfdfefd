"""Configuration: one frozen dataclass describes a method; QuIP, QuIP#, QTIP, GPTQ and RTN are presets.

A `QuantConfig` names a transform (incoherence processing), a codebook (the number format) and a
rounding algorithm. It is validated on construction and round-trips to JSON, so a checkpoint records
exactly how it was made and a misspelt option fails loudly instead of silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from quipkit.codebooks.trellis import ONE_MAD_INCREMENT
from quipkit.errors import QuipkitError

CONFIG_VERSION = 1

HEAD_BITS = (32, 16, 8, 6, 4)
PROPAGATIONS = ("original", "quantized")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize every selected linear layer of a model."""

    method: str
    bits: int
    codebook: dict[str, Any]
    transform: dict[str, Any]
    rounding: str = "ldlq"
    greedy_sweeps: int = 0
    act_order: bool = False
    sequential: bool = False
    damping: float = 0.01
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, dict[str, Any]], ...] = ()
    propagate: str = "quantized"
    seed: int = 0
    # bits of the output head (and a tied embedding): 8/6/4 an integer grid, 16 bf16, 32 float32. 8 by
    # default: on SmolLM2-135M the bf16 head was a quarter of a 2-bit model's decode time and 40% of its
    # folder; at 8 bits it costs 0.08% of QuIP# 2-bit's perplexity
    head_bits: int = 8
    blocks: str | None = None  # the decoder blocks' ModuleList (e.g. model.language_model.layers); None: found
    # CALDERA's low-rank term: {"rank", "codebook" (the factors' spec), "outer_iters", "inner_iters"}
    low_rank: dict[str, Any] | None = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        # Imported here: the registries import this module.
        from quipkit.codebooks import make_codebook
        from quipkit.codebooks.low_rank import LowRank
        from quipkit.rounding import SOLVERS
        from quipkit.transforms import make_transform

        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "overrides", tuple((p, dict(o)) for p, o in self.overrides))
        if self.rounding not in SOLVERS:
            raise QuipkitError(f"unknown rounding '{self.rounding}'; choose one of {', '.join(SOLVERS)}")
        if (self.low_rank is not None) != (self.rounding == "caldera"):
            raise QuipkitError("a low-rank term needs the caldera rounding and the caldera rounding needs one")
        if self.low_rank is not None:
            object.__setattr__(self, "low_rank", dict(self.low_rank))
            if set(self.low_rank) != {"rank", "codebook", "outer_iters", "inner_iters"}:
                raise QuipkitError(f"low_rank takes rank, codebook, outer_iters and inner_iters; got {sorted(self.low_rank)}")
            LowRank(self.low_rank["rank"], self.low_rank["codebook"])
            for key in ("outer_iters", "inner_iters"):
                if not isinstance(self.low_rank[key], int) or self.low_rank[key] < 1:
                    raise QuipkitError(f"{key} must be an integer >= 1, got {self.low_rank[key]!r}")
        if self.propagate not in PROPAGATIONS:
            raise QuipkitError(f"unknown propagate '{self.propagate}'; choose one of {', '.join(PROPAGATIONS)}")
        if self.greedy_sweeps < 0:
            raise QuipkitError(f"greedy_sweeps must be >= 0, got {self.greedy_sweeps}")
        if not 0 < self.damping < 1:
            raise QuipkitError(f"damping must be in (0, 1), got {self.damping}")
        if self.head_bits not in HEAD_BITS:
            raise QuipkitError(
                f"head_bits must be one of {', '.join(map(str, HEAD_BITS))} (16: bf16, 32: float32), got {self.head_bits}"
            )
        if self.version != CONFIG_VERSION:
            raise QuipkitError(
                f"config version {self.version} is not supported by this quipkit (expects {CONFIG_VERSION}); "
                "upgrade quipkit or re-quantize"
            )
        codebook = make_codebook(self.codebook)
        make_transform(self.transform)
        if self.act_order and codebook.dim != 1:
            raise QuipkitError("act_order needs a scalar codebook (one column per rounding step)")
        for pattern in self.include + self.exclude + tuple(p for p, _ in self.overrides):
            try:
                re.compile(pattern)
            except re.error as err:
                raise QuipkitError(f"layer pattern '{pattern}' is not a valid regular expression: {err}") from None
        for pattern, override in self.overrides:
            unknown = set(override) - {"method", "bits"}
            if unknown:
                raise QuipkitError(
                    f"override for '{pattern}' sets {sorted(unknown)}; overrides may set only 'method' and 'bits'"
                )
            self.with_method(override.get("method", self.method), override.get("bits", self.bits))

    @property
    def needs_calibration(self) -> bool:
        """Whether any layer's quantization looks at calibration statistics (Hessians)."""
        from quipkit.transforms import make_transform

        configs = [self] + [self.with_method(o.get("method", self.method), o.get("bits", self.bits)) for _, o in self.overrides]
        return any(c.rounding != "nearest" or make_transform(c.transform).uses_hessian for c in configs)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["include"] = list(self.include)
        out["exclude"] = list(self.exclude)
        out["overrides"] = [[p, o] for p, o in self.overrides]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise QuipkitError(f"unknown quantization config keys {sorted(unknown)}")
        data = dict(data)
        data["overrides"] = tuple((p, o) for p, o in data.get("overrides", ()))
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_method(self, method: str, bits: int) -> "QuantConfig":
        """The preset `method` at `bits`, keeping this config's method-independent settings."""
        preset = make_config(method, bits)
        return dataclasses.replace(
            preset,
            damping=self.damping,
            include=self.include,
            exclude=self.exclude,
            propagate=self.propagate,
            seed=self.seed,
            head_bits=self.head_bits,
            blocks=self.blocks,
        )

    def for_layer(self, name: str) -> "QuantConfig":
        """The config that applies to layer `name`: the last matching override wins."""
        chosen = self
        for pattern, override in self.overrides:
            if re.search(pattern, name):
                chosen = self.with_method(override.get("method", self.method), override.get("bits", self.bits))
        return chosen


@dataclass(frozen=True)
class CalibrationConfig:
    """Which text calibrates the Hessians: `nsamples` windows of `seqlen` tokens, drawn with `seed`."""

    nsamples: int = 128
    seqlen: int = 512
    sources: tuple[str, ...] = ("wikitext2", "c4")
    seed: int = 0
    batch_size: int = 8
    activations: str = "float32"  # the dtype block inputs are held in between blocks: float32 or bfloat16
    # "input": H = E[x x^T] per input; "guided": per group of a layer's output rows, each token's x x^T
    # weighted by the squared gradient of the model's loss with respect to those outputs (GuidedQuant)
    hessian: str = "input"
    guided_groups: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(self.sources))
        if self.hessian not in ("input", "guided"):
            raise QuipkitError(f"unknown Hessian '{self.hessian}'; choose input or guided")
        if self.guided_groups < 1:
            raise QuipkitError(f"guided_groups must be >= 1, got {self.guided_groups}")
        if self.nsamples < 1 or self.seqlen < 2 or self.batch_size < 1:
            raise QuipkitError("calibration needs nsamples >= 1, seqlen >= 2 and batch_size >= 1")
        if self.activations not in ("float32", "bfloat16"):
            raise QuipkitError(f"unknown activations dtype '{self.activations}'; choose float32 or bfloat16")
        if not self.sources:
            raise QuipkitError("calibration needs at least one text source")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sources"] = list(self.sources)
        if self.hessian == "input":  # what every run had before guided Hessians: fingerprints and caches stay valid
            del out["hessian"], out["guided_groups"]
        return out


# ---------------------------------------------------------------------------------------------
# Method presets: a registry of functions (bits, **options) -> QuantConfig.

Preset = Callable[..., QuantConfig]
METHODS: dict[str, Preset] = {}
METHOD_BITS: dict[str, tuple[int, ...]] = {}
METHOD_HELP: dict[str, str] = {}


def register_method(name: str, bits: tuple[int, ...], help: str) -> Callable[[Preset], Preset]:
    def decorate(fn: Preset) -> Preset:
        METHODS[name] = fn
        METHOD_BITS[name] = bits
        METHOD_HELP[name] = help
        return fn

    return decorate


def make_config(method: str, bits: int, **options: Any) -> QuantConfig:
    """The preset for `method` at `bits`, with `options` (e.g. group_size=64) applied."""
    key = method.lower()
    if key not in METHODS:
        raise QuipkitError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    if bits not in METHOD_BITS[key]:
        allowed = ", ".join(str(b) for b in METHOD_BITS[key])
        raise QuipkitError(f"method '{key}' does not support {bits} bits; choose one of {allowed}")
    try:
        return METHODS[key](bits, **options)
    except TypeError as err:
        raise QuipkitError(f"bad option for method '{key}': {err}") from None


def _common(options: dict[str, Any]) -> dict[str, Any]:
    """Options every preset accepts, passed straight to QuantConfig."""
    allowed = {"damping", "include", "exclude", "overrides", "propagate", "seed", "head_bits", "blocks"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected options {sorted(unknown)}")
    return options


@register_method("rtn", (2, 3, 4, 8), "round to nearest on a per-group asymmetric grid (baseline)")
def _rtn(bits: int, group_size: int = 128, symmetric: bool = False, **options: Any) -> QuantConfig:
    return QuantConfig(
        method="rtn",
        bits=bits,
        codebook={"name": "scalar", "bits": bits, "group_size": group_size, "symmetric": symmetric},
        transform={"name": "identity"},
        rounding="nearest",
        **_common(options),
    )


@register_method("gptq", (2, 3, 4, 8), "GPTQ: LDLQ with g=1 on a per-group asymmetric grid (baseline)")
def _gptq(
    bits: int,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = True,
    incoherence: bool = False,
    sequential: bool = True,
    clip: bool | None = None,
    outlier_ratio: float | None = None,
    **options: Any,
) -> QuantConfig:
    """`clip` (default: on with `incoherence`) searches each group's range instead of min-max:
    incoherence processing leaves Gaussian-like weights, whose min-max 2-bit grid is far too wide.
    `outlier_ratio` puts each row's largest weights on a grid of their own (ICQuant's split)."""
    transform = {"name": "kronecker", "rescale": True} if incoherence else {"name": "identity"}
    clip = incoherence if clip is None else clip
    if outlier_ratio is None:
        codebook = {"name": "scalar", "bits": bits, "group_size": group_size, "symmetric": symmetric, "clip": clip}
    elif incoherence or symmetric:
        raise TypeError("outlier_ratio splits the raw weights' own outliers: it takes neither incoherence nor symmetric")
    else:
        codebook = {"name": "icquant", "bits": bits, "ratio": outlier_ratio, "clip": clip, "group_size": group_size}
    return QuantConfig(
        method="gptq",
        bits=bits,
        codebook=codebook,
        transform=transform,
        rounding="ldlq",
        act_order=act_order,
        sequential=sequential,
        **_common(options),
    )


@register_method("quip#", (2, 3, 4), "QuIP#: random Hadamard transform + E8P lattice codebook (RVQ at 3/4 bits) + BlockLDLQ")
def _quip_sharp(bits: int, greedy_sweeps: int = 2, **options: Any) -> QuantConfig:
    codebook = {"name": "e8p", "bits": 2} if bits == 2 else {"name": "rvq", "bits": bits}
    options.setdefault("propagate", "original")
    return QuantConfig(
        method="quip#",
        bits=bits,
        codebook=codebook,
        transform={"name": "rht"},
        rounding="ldlq",
        greedy_sweeps=greedy_sweeps,
        **_common(options),
    )


@register_method("qtip", (2, 3, 4), "QTIP: random Hadamard transform + bitshift trellis codes (Viterbi) + BlockLDLQ on 16x16 tiles")
def _qtip(
    bits: int, L: int = 16, trellis_code: str = "1mad", increment: int | None = None, greedy_sweeps: int = 0,
    **options: Any,
) -> QuantConfig:
    """`increment`: 1MAD's LCG constant (QTIP's 76625530 gives the paper's code; the default,
    ONE_MAD_INCREMENT, decodes faster)."""
    options.setdefault("propagate", "original")
    codebook = {"name": "trellis", "bits": bits, "L": L, "code": trellis_code}
    if trellis_code == "1mad":
        codebook["increment"] = ONE_MAD_INCREMENT if increment is None else increment
    elif increment is not None:
        raise QuipkitError(f"--increment is the 1MAD code's constant; drop it or use --trellis-code 1mad, not {trellis_code}")
    return QuantConfig(
        method="qtip",
        bits=bits,
        codebook=codebook,
        transform={"name": "rht"},
        rounding="ldlq",
        greedy_sweeps=greedy_sweeps,
        **_common(options),
    )


@register_method("quip", (2, 3, 4), "QuIP: Kronecker random orthogonal incoherence + LDLQ on a uniform grid + greedy passes")
def _quip(
    bits: int, rescale: bool = True, order: str = "natural", greedy_sweeps: int = 10, sequential: bool = True, **options: Any
) -> QuantConfig:
    """`order="rg"` is LDLQ-RG: columns by decreasing diagonal of the processed Hessian. Greedy passes
    run until a sweep no longer lowers the proxy (at most `greedy_sweeps`)."""
    if order not in ("natural", "rg"):
        raise TypeError(f"order must be 'natural' or 'rg', got {order!r}")
    return QuantConfig(
        method="quip",
        bits=bits,
        codebook={"name": "uniform", "bits": bits},
        transform={"name": "kronecker", "rescale": rescale},
        rounding="ldlq",
        greedy_sweeps=greedy_sweeps,
        act_order=order == "rg",
        sequential=sequential,
        **_common(options),
    )


@register_method("caldera", (2, 3, 4), "CALDERA: QuIP#'s codes plus a low-rank term L R with quantized factors "
                 "(`rank`, `lr_bits`, `lr_format`), fitted by alternating with LDLQ")
def _caldera(bits: int, rank: int = 64, lr_bits: int = 4, lr_format: str | None = None, lr_group_size: int | None = None,
             outer_iters: int = 3, inner_iters: int = 3, base: str = "quip#", L: int = 16,
             greedy_sweeps: int | None = None, **options: Any) -> QuantConfig:
    """Q is the `base` method's codebook after the RHT (QuIP#'s E8P by default, or QTIP's trellis with
    `L`). L and R are `lr_bits`-bit codes: `lr_format="trellis"` (the default up to 4 bits, unless
    `lr_group_size` is given) QTIP's 1MAD trellis (L = 12) with an fp16 scale per factor row, or
    `"grid"` a grid with groups of `lr_group_size` (64); 16 bits keeps them bf16. On the reference
    model, rank 128 with 2-bit factors: wt2 45.20 at 2.886 bits on the grid, 40.79 at 2.810 in the
    trellis (the grid's group scales cost 0.28 bits per entry); grid factors can train in
    fine-tuning. The factors' storage counts in the bits per weight: rank k costs about
    k (m + n) lr_bits / (m n)."""
    if base not in ("quip#", "qtip"):
        raise TypeError(f"base must be 'quip#' or 'qtip', got {base!r}")
    if base == "qtip":
        options["L"] = L
    if greedy_sweeps is not None:
        options["greedy_sweeps"] = greedy_sweeps
    if lr_format is None:
        lr_format = "trellis" if lr_bits <= 4 and lr_group_size is None else "grid"
    if lr_format not in ("trellis", "grid"):
        raise QuipkitError(f"lr_format must be 'trellis' or 'grid', got {lr_format!r}")
    if lr_bits == 16:
        if lr_format == "trellis":
            raise QuipkitError("16-bit factors are bf16, not a trellis code: drop --lr-format trellis or lower --lr-bits")
        factors = {"name": "dense", "bits": 16}
    elif lr_format == "trellis":
        if lr_group_size is not None:
            raise QuipkitError("lr_group_size is the grid's: trellis factors scale per row; drop it or use --lr-format grid")
        if not 1 <= lr_bits <= 4:
            raise QuipkitError(f"trellis factors take 1 to 4 bits, got --lr-bits {lr_bits}; use --lr-format grid for more")
        factors = {"name": "trellis", "bits": lr_bits, "L": 12, "code": "1mad", "increment": ONE_MAD_INCREMENT}
    else:
        factors = {"name": "scalar", "bits": lr_bits, "group_size": lr_group_size or 64, "clip": True}
    return dataclasses.replace(
        METHODS[base](bits, **options),
        method="caldera",
        rounding="caldera",
        low_rank={"rank": rank, "codebook": factors, "outer_iters": outer_iters, "inner_iters": inner_iters},
    )


@register_method("icquant", (2, 3, 4), "ICQuant: each row's largest weights (`outlier_ratio`) on a grid of their "
                 "own, their positions index-coded (~0.3 bits at 5%), LDLQ through the Hessian")
def _icquant(bits: int, outlier_ratio: float = 0.05, clip: bool = True, sequential: bool = True,
             inliers: str = "grid", saliency: str = "magnitude", act_order: bool = True, greedy_sweeps: int = 2,
             **options: Any) -> QuantConfig:
    """No transform: an incoherence transform spreads the outliers out, which is the opposite of what
    the split grid is for. `inliers="table"`: per-row levels by k-means weighted by the Hessian's
    diagonal (ICQuant^SK) instead of the even grid. `saliency="hessian"`: outliers by |w| sqrt(H_jj).
    Act-order and QuIP#'s greedy sweeps after LDLQ: without a transform the Hessian's diagonal is
    uneven, and together they lowered the proxy loss on every real layer tried (blocks 0, 3 and 29 of
    the reference model at 2 bits: 11-14% on average).
    `gptq --outlier-ratio R` is the same split on GPTQ's grouped grid."""
    codebook = {"name": "icquant", "bits": bits, "ratio": outlier_ratio, "clip": clip}
    codebook.update({"inliers": inliers} if inliers != "grid" else {})
    codebook.update({"saliency": saliency} if saliency != "magnitude" else {})
    return QuantConfig(
        method="icquant",
        bits=bits,
        codebook=codebook,
        transform={"name": "identity"},
        rounding="ldlq",
        act_order=act_order,
        greedy_sweeps=greedy_sweeps,
        sequential=sequential,
        **_common(options),
    )


def _gguf_preset(block_type: str, bits: int, codebook: str = "ggml", blurb: str = "blocks of 32") -> None:
    """`gguf-<type>`: llama.cpp's block format `type`, no transform (llama.cpp could not undo one),
    rounded by LDLQ with the real Hessian and act-order, layer after layer like GPTQ."""

    def preset(bits: int, act_order: bool = True, clip: bool = True, sequential: bool = True, **options: Any) -> QuantConfig:
        options.setdefault("head_bits", 16)  # the export writes a bf16 head in llama.cpp's own type
        return QuantConfig(
            method=f"gguf-{block_type}",
            bits=bits,
            codebook={"name": codebook, "type": block_type, "clip": clip},
            transform={"name": "identity"},
            rounding="ldlq",
            act_order=act_order,
            sequential=sequential,
            **_common(options),
        )

    register_method(f"gguf-{block_type}", (bits,),
                    f"llama.cpp's {block_type.upper()} {blurb} rounded by LDLQ through the Hessian; "
                    "`quipkit export --format gguf` writes a file llama.cpp runs")(preset)


for _type, _bits in (("q4_0", 4), ("q4_1", 4), ("q8_0", 8), ("iq4_nl", 4)):
    _gguf_preset(_type, _bits)
for _type, _bits in (("q4_k", 4), ("q3_k", 3), ("q2_k", 2)):
    _gguf_preset(_type, _bits, "ggml_k", "superblocks of 256 (IQ4_NL where a row is not in 256s)")


def default_bits(method: str) -> int:
    """The bits `method` runs at when none are asked for: its only width, else 2."""
    widths = METHOD_BITS.get(method.lower(), ())
    return widths[0] if len(widths) == 1 else 2
