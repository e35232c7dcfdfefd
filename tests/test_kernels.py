"""Every fast kernel against its eager reference: random stored tensors (every code value is valid),
every codebook, the reference model's shapes, the tiny models' shapes and odd ones, activation
batches on both sides of the matvec/GEMM switch, and every instruction-set tier this CPU has."""

from __future__ import annotations

import sys

import pytest
import torch

from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.codebooks.trellis import ONE_MAD_INCREMENT
from quipkit.errors import QuipkitError
from quipkit.kernels import cpu, dispatch
from quipkit.kernels.ops import decode_matmul, hadamard
from quipkit.kernels.reference import reference_hadamard, reference_matmul
from quipkit.transforms.rht import random_signs

needs_native = pytest.mark.skipif(not native.available(), reason="the compiled extension is not built")

SPECS = (
    [{"name": "scalar", "bits": b, "group_size": g} for b in (2, 3, 4, 6, 8) for g in (128, 32)]
    + [{"name": "scalar", "bits": 4, "group_size": 20}, {"name": "scalar", "bits": 3, "group_size": 64, "symmetric": True}]
    + [{"name": "uniform", "bits": b} for b in (2, 3, 4, 8)]
    + [{"name": "e8p", "bits": 2}, {"name": "rvq", "bits": 3}, {"name": "rvq", "bits": 4}]
    + [{"name": "trellis", "bits": k, "L": 16, "code": c} for k in (1, 2, 3, 4) for c in ("1mad", "3inst")]
    + [{"name": "trellis", "bits": 2, "L": 12, "code": "1mad"}, {"name": "trellis", "bits": 2, "L": 16, "code": "hyb"},
       {"name": "trellis", "bits": 3, "L": 10, "code": "lut"}]
    # quipkit's 1MAD increment (no low 16 bits: the AVX-512 column kernels' other case) and an odd one
    + [{"name": "trellis", "bits": k, "L": L, "code": "1mad", "increment": ONE_MAD_INCREMENT} for k, L in ((2, 12), (2, 16), (3, 16))]
    + [{"name": "trellis", "bits": 2, "L": 12, "code": "1mad", "increment": i} for i in (0xFFFFFFFF, 0)]
    + [{"name": "dense", "bits": 16}, {"name": "dense", "bits": 32}]
)
# (rows, cols): the reference model's, the tiny models', and odd ones (rows not a multiple of the
# 16-lane width, E8P rows with an odd number of codes, group sizes that do not divide the row)
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (64, 64), (128, 64), (64, 128), (50, 40), (33, 200)]


def tiers() -> list[str]:
    if not native.available():
        return []
    best = native.module().isa()
    order = ["portable", "avx2", "avx512"]
    return order[: order.index(best) + 1]


@pytest.fixture(params=tiers() or ["none"])
def tier(request):
    if request.param == "none":
        pytest.skip("the compiled extension is not built")
    before = native.module().isa()
    native.module().isa(request.param)
    yield request.param
    native.module().isa(before)


def random_stored(codebook, rows: int, cols: int, seed: int) -> list[torch.Tensor]:
    """Stored tensors of the right shapes and dtypes with random contents (all of them valid codes)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in codebook.storage(rows, cols).values():
        if dtype.is_floating_point:
            out.append((torch.randn(shape, generator=gen) * 0.1 + 0.02).to(dtype))
        elif dtype == torch.uint8:
            out.append(torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8))
        else:
            out.append(torch.randint(-(2**15), 2**15, shape, generator=gen, dtype=torch.int16))
    return out


def fits(codebook, rows: int, cols: int) -> bool:
    return cols % codebook.dim == 0 and rows % codebook.row_block == 0


def assert_matches(y: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item() + 1e-6
    assert (y - ref).abs().max().item() <= 2e-5 * scale, f"max error {(y - ref).abs().max().item():.3g} at scale {scale:.3g}"


@needs_native
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_cpu_kernels_match_the_reference(spec, tier):
    codebook = make_codebook(spec)
    for i, (rows, cols) in enumerate(SHAPES):
        if not fits(codebook, rows, cols):
            continue
        stored = random_stored(codebook, rows, cols, seed=i)
        for batch in (1, 3, 8, 9, 40):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            kernel = dispatch.select_kernel(x, codebook, rows, cols)
            assert kernel.name == ("torch-dense" if spec == {"name": "dense", "bits": 32} else
                                   "cpu-fused-matvec" if batch <= cpu.MATVEC_MAX_ROWS else "cpu-tiled-gemm")
            assert_matches(kernel.run(x, stored, codebook, rows, cols), reference_matmul(x, stored, codebook, rows, cols))


def icquant_stored(spec: dict, rows: int, cols: int, seed: int, width: int | None = None):
    """An ICQuant layer's codebook and stored tensors (the index code has to be a valid one, so they are
    fitted to heavy-tailed random weights), optionally with the positions coded at symbol `width`."""
    from quipkit.codebooks import outlier_positions

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.randn(rows, cols, generator=gen).exp()
    codebook = make_codebook(spec)
    params = codebook.fit(weight)
    codes, _ = codebook.quantize(weight, params, torch.arange(cols))
    stored = codebook.pack(codes, params)
    if width is not None:
        stream, _ = outlier_positions.encode(params["mask"], width)
        stored["positions"] = torch.cat([stream.new_tensor([width]), stream])
    codebook = make_codebook(codebook.packed_spec(stored))
    return codebook, [stored[name] for name in codebook.storage(rows, cols)]


@needs_native
@pytest.mark.parametrize("spec", [{"name": "icquant", "bits": 2, "ratio": 0.05},
                                  {"name": "icquant", "bits": 3, "ratio": 0.02, "group_size": 64},
                                  {"name": "icquant", "bits": 2, "ratio": 0.08, "inliers": "table"},
                                  {"name": "icquant", "bits": 4, "ratio": 0.0}], ids=lambda s: "-".join(map(str, s.values())))
def test_icquant_kernels_match_the_reference(spec, tier):
    # width 2: gaps longer than the escape (3) on most rows; None: the width the format picks
    for i, ((rows, cols), width) in enumerate([((50, 40), None), ((192, 576), None), ((33, 200), 2), ((64, 128), 9)]):
        codebook, stored = icquant_stored(spec, rows, cols, seed=i, width=width if spec["ratio"] else None)
        for batch in (1, 3, 9):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            kernel = dispatch.select_kernel(x, codebook, rows, cols)
            assert kernel.name == ("cpu-fused-matvec" if batch <= cpu.MATVEC_MAX_ROWS else "cpu-tiled-gemm")
            assert_matches(kernel.run(x, stored, codebook, rows, cols), reference_matmul(x, stored, codebook, rows, cols))
        dense = codebook.dequantize(dict(zip(codebook.storage(rows, cols), stored)), rows, cols)
        assert torch.equal(cpu.decode_rows(stored, codebook, rows, cols, 7, rows - 3), dense[7 : rows - 3])


@needs_native
@pytest.mark.parametrize("width", [0, 17])
def test_a_damaged_outlier_index_width_is_a_one_line_error(width):
    # width 0 would never end the kernel's walk; both must stop before any kernel reads the stream
    codebook, stored = icquant_stored({"name": "icquant", "bits": 2, "ratio": 0.05}, 64, 256, seed=3)
    damaged = stored[-1].clone()
    damaged[0] = width
    with pytest.raises(QuipkitError, match=f"symbol width is {width}, not 1 to 16"):
        cpu.matvec(torch.randn(1, 256), stored[:-1] + [damaged], codebook, 64, 256)


@needs_native
def test_tiled_gemm_covers_weights_larger_than_one_tile(monkeypatch, tier):
    monkeypatch.setattr(cpu, "TILE_WEIGHTS", 64 * 64)
    for spec in ({"name": "e8p", "bits": 2}, {"name": "trellis", "bits": 2, "L": 12, "code": "3inst"},
                 {"name": "scalar", "bits": 4, "group_size": 32}, {"name": "dense", "bits": 16}):
        codebook = make_codebook(spec)
        stored = random_stored(codebook, 336, 64, seed=1)  # 336 rows: five full tiles and a partial one
        x = torch.randn(2, 7, 64)
        assert_matches(cpu.tiled_matmul(x, stored, codebook, 336, 64), reference_matmul(x, stored, codebook, 336, 64))
        rows = cpu.decode_rows(stored, codebook, 336, 64, 16, 48)
        assert torch.allclose(rows, codebook.dequantize(dict(zip(codebook.storage(336, 64), stored)), 336, 64)[16:48])


@needs_native
@pytest.mark.parametrize("n", [64, 96, 192, 288, 576, 1536, 4096, 11008, 14336, 8, 24, 40])
def test_cpu_hadamard_matches_the_reference(n, tier):
    x = torch.randn(3, 2, n)
    signs = random_signs(n, seed=n)
    for pre, post, transpose in ((signs, None, True), (None, signs, False), (None, None, True)):
        assert dispatch.select_hadamard(x.reshape(-1, n)).name == "cpu-hadamard"
        assert_matches(cpu.hadamard(x, pre, post, transpose), reference_hadamard(x, pre, post, transpose))


def test_dimensions_without_a_hadamard_factor_use_the_reference_dct():
    x = torch.randn(2, 10920)
    assert dispatch.select_hadamard(x).name == "reference"
    y = hadamard(x, random_signs(10920, 1), None, True)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-4)  # orthonormal


def test_the_ops_keep_shape_and_dtype_and_give_gradients_to_the_activations():
    codebook = make_codebook({"name": "e8p", "bits": 2})
    stored = random_stored(codebook, 48, 64, seed=3)
    spec = dispatch.spec_of(codebook)
    weight = codebook.dequantize(dict(zip(codebook.storage(48, 64), stored)), 48, 64)
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = decode_matmul(x, stored, spec, 48, 64)
    assert y.shape == (2, 5, 48)
    (y.square().sum()).backward()
    expected = 2 * (x.detach() @ weight.t()) @ weight
    assert_matches(x.grad, expected)
    signs = random_signs(64, 5)
    x.grad = None
    hadamard(x, signs, None, True).square().sum().backward()  # orthonormal: the gradient of |Hx|^2 is 2x
    assert_matches(x.grad, 2 * x.detach())
    half = decode_matmul(x.detach().bfloat16(), stored, spec, 48, 64)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), x.detach() @ weight.t(), rtol=0.05, atol=0.5)


def test_float64_inputs_stay_exact_through_the_reference():
    codebook = make_codebook({"name": "trellis", "bits": 2, "L": 12, "code": "1mad"})
    stored = random_stored(codebook, 32, 32, seed=4)
    x = torch.randn(3, 32, dtype=torch.float64)
    y = decode_matmul(x, stored, dispatch.spec_of(codebook), 32, 32)
    assert y.dtype == torch.float64
    assert torch.equal(y, reference_matmul(x, stored, codebook, 32, 32))


def test_reference_only_mode_routes_everything_to_the_reference(monkeypatch):
    monkeypatch.setenv("QUIPKIT_KERNELS", "reference")
    dispatch.forget_choices()
    try:
        codebook = make_codebook({"name": "e8p", "bits": 2})
        x = torch.randn(1, 64)
        assert dispatch.select_kernel(x, codebook, 16, 64) is dispatch.REFERENCE
        assert dispatch.select_hadamard(x) is dispatch.HADAMARD_REFERENCE
    finally:
        monkeypatch.delenv("QUIPKIT_KERNELS")
        dispatch.forget_choices()


@needs_native
@pytest.mark.parametrize("spec", [{"name": "e8p", "bits": 2}, {"name": "trellis", "bits": 2, "L": 16, "code": "hyb"},
                                  {"name": "trellis", "bits": 2, "L": 12, "code": "1mad"},
                                  {"name": "scalar", "bits": 4, "group_size": 32}, {"name": "dense", "bits": 16}],
                         ids=lambda s: "-".join(str(v) for v in s.values()))
def test_bound_calls_match_the_one_call_path(spec):
    """OneCallLinear.bound (the lean decoder's per-layer call) reads the addresses once; what it reads
    must stay alive: HYB's float table is made for the call, and freed memory is refilled with NaN."""
    codebook = make_codebook(spec)
    rows, cols = 64, 128
    stored = random_stored(codebook, rows, cols, seed=3)
    bias = torch.randn(rows)
    fast = cpu.one_call_linear(codebook, rows, cols, "identity", stored, (None, None, bias))
    call = fast.bound(stored, None, None, bias)
    refill = [torch.full((512, 2), float("nan")) for _ in range(64)]  # reuses anything the binding let go
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(4))
    expected = reference_matmul(x, stored, codebook, rows, cols) + bias
    assert_matches(call(x), expected)
    assert torch.equal(call(x), fast(x, stored, None, None, bias)) and len(refill) == 64


_OUT_OF_MEMORY = """
import resource, sys, torch
from quipkit import native
from quipkit.codebooks import make_codebook
from quipkit.kernels import cpu
native.module().isa(sys.argv[1])
codebook = make_codebook({spec!r})
rows, cols = 16, 1 << 21  # the kernel's scratch (a float row, or E8P's group sums) is megabytes
stored = [torch.randint(0, 100, shape).to(dtype) if not dtype.is_floating_point else torch.rand(shape).to(dtype)
          for shape, dtype in codebook.storage(rows, cols).values()]
x = torch.randn(1, cols)
expected = cpu.matvec(x, stored, codebook, rows, cols)
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
limits = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 18), limits[1]))
try:
    cpu.matvec(x, stored, codebook, rows, cols)
    print("no error")
except MemoryError as error:
    print("MemoryError:", error)
resource.setrlimit(resource.RLIMIT_AS, limits)
print("after:", torch.equal(cpu.matvec(x, stored, codebook, rows, cols), expected))
"""


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the address-space limit and /proc are Linux's")
@pytest.mark.parametrize("spec, tier", [({"name": "scalar", "bits": 4, "group_size": 128}, "portable")]
                         + [({"name": "e8p", "bits": 2}, t) for t in tiers()], ids=lambda v: v if isinstance(v, str) else v["name"])
def test_a_kernel_without_scratch_memory_raises_and_the_next_call_works(spec, tier):
    """A kernel whose scratch allocation fails must not write through a null pointer (a crash) or
    return a row it never computed: the call raises MemoryError with a message, and the next call works.
    (Every tier's E8P kernel allocates scratch; the hand-written grid kernels need none.) A fixed mmap
    threshold makes each megabyte-sized allocation ask the system, under the address-space limit."""
    import os
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY.format(spec=spec), tier], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "MemoryError: out of memory for a decode kernel's scratch buffers" in run.stdout, run.stdout
    assert "after: True" in run.stdout
