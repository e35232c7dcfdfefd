"""Several processes on one run (torch.distributed, gloo): the same bytes as one process, whatever the
method; a process killed mid-run stops the others with one line, and the same command resumes to
the same bytes. The Hessian sum does not depend on how the batches are grouped."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quipkit.models.synthetic import write_random_llama
from quipkit.rounding import HessianAccumulator

SHAPE = (64, 4, 128, 4, 2)


@pytest.fixture(scope="module")
def source(tmp_path_factory, smol_tokenizer) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("dist") / "random", smol_tokenizer, SHAPE, std=0.05)


def _quantize(model: Path, out: Path, method: str, bits: int, nproc: int, env: dict | None = None, *extra: str):
    argv = [sys.executable, "-m", "quipkit.cli", "quantize", str(model), "--method", method, "--bits", str(bits),
            "--out", str(out), "--nsamples", "8", "--seqlen", "32", "--calib-batch", "2", "--calibration",
            "wikitext2", "--nproc", str(nproc), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=600)


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# GPTQ: every process rounds every group (true-sequential); QuIP#: groups divided and exchanged (also
# covered by the kill test below, whose resumed two-process result equals one process's)
@pytest.mark.parametrize("method,bits", [("gptq", 4), pytest.param("quip#", 2, marks=pytest.mark.slow)])
def test_two_processes_write_the_bytes_one_process_writes(tmp_path, source, method, bits):
    one = _quantize(source, tmp_path / "one", method, bits, 1)
    assert one.returncode == 0, one.stderr[-2000:]
    # the two processes also offload their activations: they exchange the files' paths, not the data
    two = _quantize(source, tmp_path / "two", method, bits, 2, None, "--offload-activations", str(tmp_path / "spill"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_killed_process_stops_the_run_and_the_same_command_resumes(tmp_path, source):
    straight = _quantize(source, tmp_path / "straight", "quip#", 2, 1)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = _quantize(source, tmp_path / "q", "quip#", 2, 2, {"QUIPKIT_FAULT": "state-written:2"})
    assert killed.returncode != 0
    lines = [line for line in killed.stderr.splitlines() if line.startswith("quipkit: error:")]
    assert lines and "process 0 of 2 was killed (SIGKILL)" in lines[-1] and "resume" in lines[-1], killed.stderr[-2000:]
    assert "Traceback" not in killed.stderr
    resumed = _quantize(source, tmp_path / "q", "quip#", 2, 2)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from block 2" in resumed.stderr
    assert _digest(tmp_path / "q") == _digest(tmp_path / "straight")


def test_the_hessian_sum_does_not_depend_on_the_grouping_of_batches():
    gen = torch.Generator().manual_seed(0)
    # activations of very different scales, so plain float64 sums would depend on the order
    batches = [torch.randn(64, 16, generator=gen) * 10.0 ** torch.randint(-6, 6, (1,), generator=gen).item()
               for _ in range(12)]
    whole = HessianAccumulator(16)
    for x in batches:
        whole.add(x)
    for split in (1, 5, 11):
        first, second = HessianAccumulator(16), HessianAccumulator(16)
        for x in batches[split:]:
            second.add(x)
        for x in reversed(batches[:split]):
            first.add(x)
        first.merge(second)
        assert torch.equal(first.mean(), whole.mean()) and first.tokens == whole.tokens
    exact = sum((x.double().t() @ x.double()) for x in batches)  # the float32 products differ from these
    torch.testing.assert_close(whole.mean(), exact / whole.tokens, rtol=1e-5, atol=0)


def test_hessian_rounding_errors_are_held_only_where_they_occur():
    gen = torch.Generator().manual_seed(1)
    ordinary = HessianAccumulator(32)
    for _ in range(6):  # float32 products of one scale add into float64 without error
        ordinary.add(torch.randn(128, 32, generator=gen))
    assert len(ordinary.low_index) == 0
    tiny = torch.randn(128, 32, generator=gen) * 1e-12
    ordinary.add(tiny)  # 1e-24 against 1e2: every entry has an error to keep
    assert 0 < len(ordinary.low_index) <= 32 * 32
    again = HessianAccumulator.from_pair(ordinary.pair(), ordinary.tokens)
    assert torch.equal(again.mean(), ordinary.mean())
    total = ordinary.mean() * ordinary.tokens
    assert not torch.equal(total, ordinary.high)  # the errors are part of the result
