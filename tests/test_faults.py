"""Fault injection: corrupt checkpoints, killed runs, a full disk, broken numbers and bad arguments.

Every case must end in the right result or in one line naming the problem: never a traceback, never
a model with random or garbage weights. Each test counts the cases it tried in `CASES`, which the
end of the test session prints.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quipkit
from quipkit.cli import EXIT_USER_ERROR, main
from quipkit.config import CalibrationConfig, make_config
from quipkit.errors import QuipkitError
from quipkit.formats.validate import safetensors_header
from quipkit.pipeline.blockwise import quantize_blockwise

from conftest import tiny_model

CASES: Counter = Counter()
CAL = CalibrationConfig(nsamples=8, seqlen=32, batch_size=4)
ROOT = Path(__file__).resolve().parents[1]


def _tokens(n=8, t=32):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, smol_tokenizer):
    """A tiny QuIP# 2-bit checkpoint: E8P codes, fp16 sign vectors, bf16 head and embeddings, fp32 norms."""
    model = tiny_model()
    config = make_config("quip#", 2)
    report = quantize_blockwise(model, _tokens(), config, CAL, torch.device("cpu"))
    folder = tmp_path_factory.mktemp("faults") / "ckpt"
    return quipkit.save(model, smol_tokenizer, folder, config, CAL, {"layers": report.layers})


def _case(tmp_path: Path, checkpoint: Path, tensors=None, config=None) -> Path:
    """A copy of `checkpoint` (tokenizer files linked) with other tensors and/or another config.json."""
    folder = tmp_path / "case"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for path in checkpoint.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            os.symlink(path, folder / path.name)
    if tensors is None:
        shutil.copy(checkpoint / "model.safetensors", folder)
    else:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((checkpoint / "config.json").read_text()) if config is None else config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _one_line_error(capsys, argv, *needles) -> None:
    code = main(argv)
    _, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line]
    assert code == EXIT_USER_ERROR, (argv, err)
    # progress lines of the work done before the fault may come first; the error is one line, the last
    assert [line for line in lines if "error" in line.lower()] == lines[-1:] and "Traceback" not in err, err
    assert lines[-1].startswith("quipkit: error: "), err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


def _refused(capsys, folder: Path, *needles, entry_points=("info", "load")) -> None:
    """Every entry point named refuses `folder` in one line containing `needles`."""
    for entry in entry_points:
        if entry == "info":
            _one_line_error(capsys, ["info", str(folder)], *needles)
        elif entry == "eval":
            _one_line_error(capsys, ["eval", str(folder), "--ppl", "wikitext2"], *needles)
        elif entry == "generate":
            _one_line_error(capsys, ["generate", str(folder), "hi", "--max-new-tokens", "1"], *needles)
        elif entry == "load":
            with pytest.raises(QuipkitError) as caught:
                quipkit.load(folder)
            assert all(n in str(caught.value) for n in needles) and "\n" not in str(caught.value)
        elif entry == "from_pretrained":
            from transformers import AutoModelForCausalLM

            with pytest.raises(QuipkitError) as caught:
                AutoModelForCausalLM.from_pretrained(folder)
            assert all(n in str(caught.value) for n in needles)


def _other_kind(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.int32) if tensor.is_floating_point() else tensor.to(torch.float32)


def _mutations(name: str, tensor: torch.Tensor):
    """(kind, replacement or None for removed, what the error names) for one stored tensor."""
    yield "truncated", tensor[:-1].clone(), "has shape"
    reshaped = tensor.reshape(-1) if tensor.dim() > 1 else tensor.reshape(1, -1)
    yield "reshaped", reshaped.clone(), "has shape"
    yield "retyped", _other_kind(tensor), "the model needs"
    yield "removed", None, "lacks tensor"


def test_the_untouched_checkpoint_loads_and_validates(capsys, tmp_path, checkpoint):
    folder = _case(tmp_path, checkpoint)
    model, _ = quipkit.load(folder)
    reference, _ = quipkit.load(checkpoint)
    tokens = _tokens(2, 16)
    assert torch.equal(model(tokens).logits, reference(tokens).logits)
    assert main(["info", str(folder), "--json"]) == 0
    capsys.readouterr()
    CASES["control"] += 1


def test_every_tensor_truncated_reshaped_retyped_or_removed_is_refused(capsys, tmp_path, checkpoint):
    stored = load_file(str(checkpoint / "model.safetensors"))
    assert len(stored) > 40  # norms, codes, sign vectors, head, embeddings
    for name, tensor in stored.items():
        for kind, replacement, needle in _mutations(name, tensor):
            tensors = {k: v for k, v in stored.items() if k != name}
            if replacement is not None:
                tensors[name] = replacement
            folder = _case(tmp_path, checkpoint, tensors)
            _refused(capsys, folder, name, needle)
            CASES[f"tensor {kind}"] += 1
    # one of each also through eval, generate and transformers' from_pretrained
    name = "model.layers.1.mlp.down_proj.codes"
    folder = _case(tmp_path, checkpoint, {**stored, name: stored[name][:-1].clone()})
    _refused(capsys, folder, name, "has shape", entry_points=("eval", "generate", "from_pretrained"))
    CASES["tensor truncated (eval, generate, from_pretrained)"] += 1


def test_an_extra_tensor_is_refused(capsys, tmp_path, checkpoint):
    stored = load_file(str(checkpoint / "model.safetensors"))
    folder = _case(tmp_path, checkpoint, {**stored, "model.layers.0.mlp.extra": torch.zeros(3)})
    _refused(capsys, folder, "model.layers.0.mlp.extra", "does not have",
             entry_points=("info", "load", "eval", "from_pretrained"))
    CASES["tensor extra"] += 1


def _config_mutations(cfg: dict):
    """(what, mutated config.json, what the error names)."""
    layer = "model.layers.0.self_attn.q_proj"

    def edit(fn):
        copy = json.loads(json.dumps(cfg))
        fn(copy)
        return copy

    q = "quantization_config"
    yield "quant_method removed", edit(lambda c: c[q].pop("quant_method")), "not a quipkit checkpoint"
    yield "format_version removed", edit(lambda c: c[q].pop("format_version")), "checkpoint format None"
    yield "format_version a string", edit(lambda c: c[q].update(format_version="2")), "checkpoint format 2"
    yield "format_version unknown", edit(lambda c: c[q].update(format_version=99)), "checkpoint format 99"
    yield "layers removed", edit(lambda c: c[q].pop("layers")), "lists no quantized layers"
    yield "layers a list", edit(lambda c: c[q].update(layers=[])), "lists no quantized layers"
    yield "one layer removed", edit(lambda c: c[q]["layers"].pop(layer)), "q_proj"
    yield "in_features a string", edit(lambda c: c[q]["layers"][layer].update(in_features="64")), "bad spec"
    yield "out_features wrong", edit(lambda c: c[q]["layers"][layer].update(out_features=72)), "q_proj"
    yield "codebook removed", edit(lambda c: c[q]["layers"][layer].pop("codebook")), "has no codebook"
    yield "codebook unknown", edit(lambda c: c[q]["layers"][layer]["codebook"].update(name="e9p")), "e9p"
    yield "transform removed", edit(lambda c: c[q]["layers"][layer].pop("transform")), "has no transform"
    yield "transform unknown", edit(lambda c: c[q]["layers"][layer]["transform"].update(name="fft")), "fft"
    yield "embeddings a number", edit(lambda c: c[q].update(embeddings=3)), "'embeddings' is not a mapping"
    yield "hidden_size removed", edit(lambda c: c.pop("hidden_size")), "has shape"
    yield "hidden_size a string", edit(lambda c: c.update(hidden_size="sixty-four")), "config.json"
    yield "model_type unknown", edit(lambda c: c.update(model_type="nomodel")), "config.json"


def test_config_fields_removed_or_mistyped_are_refused(capsys, tmp_path, checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    for what, mutated, needle in _config_mutations(cfg):
        folder = _case(tmp_path, checkpoint, config=mutated)
        entry_points = ("info", "load") if what != "quant_method removed" else ("info",)
        _refused(capsys, folder, needle, entry_points=entry_points)
        CASES["config field"] += 1


def test_lost_quantization_config_is_never_evaluated_with_random_weights(capsys, tmp_path, checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    del cfg["quantization_config"]
    folder = _case(tmp_path, checkpoint, config=cfg)
    _refused(capsys, folder, "lost 'quantization_config'", "randomly initialised", entry_points=("eval", "generate"))
    _refused(capsys, folder, "not a quipkit checkpoint", entry_points=("info",))
    CASES["config quantization_config removed"] += 1


def test_a_cut_or_padded_weights_file_is_refused(capsys, tmp_path, checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    offsets = [0, 3, 8, 20, header_end - 1, header_end, header_end + 7, len(data) // 2, len(data) - 1]
    for offset in offsets:
        folder = _case(tmp_path, checkpoint)
        (folder / "model.safetensors").write_bytes(data[:offset])
        _refused(capsys, folder, "model.safetensors")
        CASES["file cut"] += 1
    folder = _case(tmp_path, checkpoint)
    (folder / "model.safetensors").write_bytes(data + b"\0")
    _refused(capsys, folder, "longer than its header says")
    CASES["file padded"] += 1


def _quantize_argv(source: Path, out: Path) -> list[str]:
    return ["quantize", str(source), "--method", "quip#", "--bits", "2", "--nsamples", "4", "--seqlen", "32",
            "--calib-batch", "2", "--no-check", "--out", str(out)]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, smol_tokenizer):
    folder = tmp_path_factory.mktemp("source") / "tiny"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


# Where a run is killed: after each file of a block's state (block k, its next inputs, state.json),
# at a temporary file before its rename, and at each step of the final save (over an old result).
# One of each kind runs by default (each kill costs a fresh interpreter); the rest with `make test-slow`.
KILL_POINTS = ["block-written:2", "inputs-written:1", "state-written:1", "tmp-written:5", "save-moved-aside"]
MORE_KILL_POINTS = ["tmp-written:1", "block-written:1", "inputs-written:2", "save-weights", "save-files"]


def _kill_and_resume(capsys, tmp_path: Path, source: Path, points: list[str]) -> None:
    """Kill a run at each of `points` (two at a time), rerun it, and compare with an uninterrupted run."""
    reference = tmp_path / "reference"
    assert main(_quantize_argv(source, reference)) == 0
    capsys.readouterr()
    expected = _digest(reference)
    runs = {}
    for point in points:
        out = tmp_path / re.sub(r"\W", "_", point)
        if point == "save-moved-aside":
            shutil.copytree(reference, out)  # a previous result to replace; it must never be lost
        argv = _quantize_argv(source, out) + (["--overwrite"] if point == "save-moved-aside" else [])
        env = {**os.environ, "QUIPKIT_FAULT": point, "PYTHONPATH": str(ROOT / "src")}
        runs[point] = (out, argv, subprocess.Popen([sys.executable, "-m", "quipkit.cli", *argv], env=env,
                                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        if len([r for r in runs.values() if r[2].poll() is None]) >= 2:
            next(r for r in runs.values() if r[2].poll() is None)[2].wait()
    for point, (out, argv, process) in runs.items():
        process.wait()
        assert process.returncode == -9, (point, process.stderr.read().decode()[-2000:])
        if point == "save-moved-aside":
            assert not out.exists() and any(p.name.startswith(f".{out.name}.old-") for p in tmp_path.iterdir())
        assert main(argv) == 0, (point, capsys.readouterr().err)
        capsys.readouterr()
        assert _digest(out) == expected, point
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]
        assert not leftovers and not out.with_name(out.name + ".partial").exists(), (point, leftovers)
        CASES["SIGKILL + resume"] += 1


# a kill at every write of a whole run: 73 s on a 2-core Zen 3 (the other resume tests stay in the default suite)
@pytest.mark.slow
def test_a_run_killed_at_any_write_resumes_to_identical_bytes(capsys, tmp_path, tiny_source):
    _kill_and_resume(capsys, tmp_path, tiny_source, KILL_POINTS)


@pytest.mark.slow
def test_a_run_killed_at_more_writes_resumes_to_identical_bytes(capsys, tmp_path, tiny_source):
    _kill_and_resume(capsys, tmp_path, tiny_source, MORE_KILL_POINTS)


def test_a_full_disk_during_save_keeps_the_previous_result(capsys, tmp_path, tiny_source, monkeypatch):
    out = tmp_path / "q"
    assert main(_quantize_argv(tiny_source, out)) == 0
    before = _digest(out)
    capsys.readouterr()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("quipkit.formats.checkpoint.save_file", no_space)
    monkeypatch.setattr("quipkit.formats.checkpoint.write_safetensors", no_space)  # a streamed run's writer
    _one_line_error(capsys, _quantize_argv(tiny_source, out) + ["--overwrite", "--method", "rtn", "--bits", "4"],
                    "No space left on device", "is unchanged")
    assert _digest(out) == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".q.")]
    CASES["no space on save"] += 1


def test_resume_refuses_another_model_under_the_same_name(capsys, tmp_path, smol_tokenizer):
    source = tmp_path / "m"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(source)
    smol_tokenizer.save_pretrained(source)
    out = tmp_path / "q"
    argv = _quantize_argv(source, out)
    state_folder = out.with_name("q.partial")
    from quipkit.pipeline import run_state

    real = run_state.RunState.save_block

    def stop_after_first(self, index, *args):
        real(self, index, *args)
        raise KeyboardInterrupt

    run_state.RunState.save_block = stop_after_first
    try:
        assert main(argv) == 130
    finally:
        run_state.RunState.save_block = real
    assert (state_folder / "state.json").is_file()
    shutil.rmtree(source)
    tiny_model(vocab_size=len(smol_tokenizer), seed=1).save_pretrained(source)  # other weights, same name
    smol_tokenizer.save_pretrained(source)
    _one_line_error(capsys, argv, "unfinished run with different settings")
    CASES["resume of another model"] += 1


def test_a_damaged_work_folder_is_refused_on_resume(tmp_path, monkeypatch):
    from safetensors import safe_open

    from quipkit.pipeline import run_state

    real = run_state.RunState.save_block

    def stop_after_first(self, index, *args):
        real(self, index, *args)
        raise KeyboardInterrupt

    config = make_config("quip#", 2)
    with monkeypatch.context() as patch:
        patch.setattr(run_state.RunState, "save_block", stop_after_first)
        with pytest.raises(KeyboardInterrupt):
            quantize_blockwise(tiny_model(), _tokens(), config, CAL, torch.device("cpu"), work_folder=tmp_path / "w")
    block = tmp_path / "w" / "block_0000.safetensors"
    with safe_open(str(block), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(block))
    name = "model.layers.0.mlp.up_proj.codes"
    damaged = {**tensors, name: tensors[name][:-1].clone()}
    save_file(damaged, str(block), metadata=metadata)
    with pytest.raises(QuipkitError, match=r"block_0000.safetensors does not fit layer model\.layers\.0\.mlp\.up_proj"):
        quantize_blockwise(tiny_model(), _tokens(), config, CAL, torch.device("cpu"), work_folder=tmp_path / "w")
    block.write_bytes(block.read_bytes()[:100])
    with pytest.raises(QuipkitError, match=r"block_0000.safetensors is unreadable .* delete"):
        quantize_blockwise(tiny_model(), _tokens(), config, CAL, torch.device("cpu"), work_folder=tmp_path / "w")
    CASES["damaged work folder"] += 2


def test_numerical_faults_stop_or_are_handled_and_recorded(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(QuipkitError, match=r"weight of model\.layers\.1\.mlp\.up_proj has 1 NaN/Inf"):
        quantize_blockwise(model, _tokens(), make_config("gptq", 4), CAL, torch.device("cpu"))
    CASES["NaN weight"] += 1
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[7] = float("inf")  # inf activations into attention
    with pytest.raises(QuipkitError, match=r"Hessian of model\.layers\.0\.self_attn\.\w+_proj.*NaN/Inf"):
        quantize_blockwise(model, _tokens(), make_config("gptq", 4), CAL, torch.device("cpu"))
    CASES["Inf activation"] += 1
    model = tiny_model()
    with torch.no_grad():  # two inputs of the MLP never excited: dead columns of down_proj's Hessian
        model.model.layers[0].post_attention_layernorm.weight[:2] = 0
    report = quantize_blockwise(model, _tokens(), make_config("gptq", 4), CAL, torch.device("cpu"))
    dead = {r["name"]: r["dead_inputs"] for r in report.layers}
    assert dead["model.layers.0.mlp.gate_proj"] == 2 and dead["model.layers.0.self_attn.q_proj"] == 0
    CASES["dead inputs"] += 1


def test_an_indefinite_hessian_gets_more_damping_and_it_is_recorded():
    from quipkit.pipeline.guards import definite_hessian

    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(-0.05, 2.05, 16, dtype=torch.float64)  # mean 1: one in twenty below zero
    h = basis @ torch.diag(eigenvalues) @ basis.t()
    prepared, damping, dead = definite_hessian(h, 0.01, ["layer"])
    assert damping == pytest.approx(0.1) and dead == 0
    assert torch.linalg.eigvalsh(prepared).min() > 0
    with pytest.raises(QuipkitError, match="not positive definite even with damping 1"):
        definite_hessian(-torch.eye(16, dtype=torch.float64) * 5, 0.01, ["layer"])
    CASES["indefinite Hessian"] += 2


def test_proxy_and_quality_warnings():
    from quipkit.pipeline.guards import proxy_warning, quality_warning

    assert proxy_warning("a", 0.05, 2) is None and proxy_warning("a", 0.6, 2) is not None
    assert proxy_warning("a", 0.02, 4) is None and "far above" in proxy_warning("a", 0.04, 4)
    assert quality_warning("quip#", 2, 78.5, 28.7) is None  # 2.7x: poor, not unusable
    text = quality_warning("rtn", 2, 3.6e6, 28.7)
    assert text == "2-bit rtn is unusable on this model: quick perplexity 3.6e+06 vs 28.7 float; try quip# or qtip"
    assert "unusable" in quality_warning("gptq", 2, float("nan"), 28.7)
    CASES["warnings"] += 5


def test_bad_arguments_fail_before_the_model_loads(capsys, tmp_path, tiny_source, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("quipkit.models.loading.load_float_model", no_loading)
    out = str(tmp_path / "o")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    cases = [
        (["--seqlen", "100000"], ["--seqlen 100000 is longer than the model's context of 256 tokens"]),
        (["--calibration", str(empty)], ["is empty"]),
        (["--calibration", str(empty), "--method", "rtn"], ["is empty"]),
        (["--calibration", str(short)], ["has 11 bytes, too few for one window of 32 tokens"]),
        (["--calibration", str(tmp_path / "none.txt")], ["no such text file"]),
        (["--hessian-cache", str(short)], ["is a file; pass a folder"]),
    ]
    for extra, needles in cases:
        argv = ["quantize", str(tiny_source), "--seqlen", "32", "--out", out, *extra]
        _one_line_error(capsys, argv, *needles)
        CASES["argument"] += 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _one_line_error(capsys, ["quantize", "no-org/no-such-model", "--out", out], "not in the Hugging Face cache")
    _one_line_error(capsys, ["eval", "no-org/no-such-model"], "not in the Hugging Face cache")
    CASES["offline hub id"] += 2


def test_leftovers_of_a_killed_save_are_cleaned_and_a_moved_result_restored(tmp_path, checkpoint):
    from quipkit.formats.checkpoint import recover_save

    dead = 2**22 + 12345  # beyond pid_max's default: no such process
    out = tmp_path / "q"
    (tmp_path / f".q.tmp-{dead}").mkdir()
    shutil.copytree(checkpoint, tmp_path / f".q.old-{dead}")
    (tmp_path / f".q.tmp-{os.getpid()}").mkdir()  # a live process's: left alone
    recover_save(out)
    assert _digest(out) == _digest(checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".q.tmp-{os.getpid()}", "q"]
    CASES["leftover folders"] += 2


def test_no_pickle_on_any_load_path():
    """torch.load and pickle run code from the file: nothing in the package may use them on user files."""
    offenders = []
    for path in (ROOT / "src" / "quipkit").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\btorch\.load\(|\bimport pickle\b|\bpickle\.|\bcloudpickle\b|\bdill\b|allow_pickle=True",
                         line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []
    CASES["pickle grep"] += 1
