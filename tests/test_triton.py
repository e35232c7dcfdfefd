"""The Triton kernels against the eager reference, run by Triton's interpreter on the CPU
(conftest sets TRITON_INTERPRET=1), on small shapes: every codebook, matvec and tiled GEMM, odd
shapes, and the Hadamard transform. On a GPU the same kernels serve CUDA tensors."""

from __future__ import annotations

import pytest
import torch

from quipkit.codebooks import make_codebook
from quipkit.kernels import dispatch
from quipkit.kernels.reference import reference_hadamard, reference_matmul
from quipkit.transforms.rht import random_signs

from test_kernels import SPECS, assert_matches, fits, random_stored

triton_kernels = pytest.importorskip("quipkit.kernels.triton", reason="triton is not installed (make test installs it)")

SHAPES = [(32, 64), (16, 128), (50, 40)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(str(v) for v in s.values()))
def test_triton_kernels_match_the_reference(spec):
    codebook = make_codebook(spec)
    for i, (rows, cols) in enumerate(SHAPES):
        if not fits(codebook, rows, cols):
            continue
        stored = random_stored(codebook, rows, cols, seed=i)
        x = torch.randn(3, cols, generator=torch.Generator().manual_seed(i))
        expected = reference_matmul(x, stored, codebook, rows, cols)
        assert_matches(triton_kernels.matvec(x, stored, codebook, rows, cols), expected)
        assert_matches(triton_kernels.tiled_matmul(x, stored, codebook, rows, cols), expected)
        rows_3_to_19 = triton_kernels.decode_rows(stored, codebook, rows, cols, 3, min(rows, 19))
        dense = codebook.dequantize(dict(zip(codebook.storage(rows, cols), stored)), rows, cols)
        assert torch.allclose(rows_3_to_19, dense[3:19], atol=1e-6)


@pytest.mark.parametrize("n", [64, 192, 576, 40, 24])
def test_triton_hadamard_matches_the_reference(n):
    x = torch.randn(2, 3, n)
    signs = random_signs(n, seed=n)
    for pre, post, transpose in ((signs, None, True), (None, signs, False), (None, None, False)):
        assert_matches(triton_kernels.hadamard(x, pre, post, transpose), reference_hadamard(x, pre, post, transpose))


def test_cuda_tensors_get_the_triton_kernels():
    names = {(k.name, k.device) for k in dispatch.KERNELS}
    assert {("triton-fused-matvec", "cuda"), ("triton-tiled-gemm", "cuda")} <= names
    assert ("triton-hadamard", "cuda") in {(k.name, k.device) for k in dispatch.HADAMARD_KERNELS}
