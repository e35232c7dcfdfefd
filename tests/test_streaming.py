"""Streamed quantization: a model read block by block from its safetensors files gives the checkpoint the
whole-model path gives, bit for bit; sharded output loads; an interrupted streamed run resumes to the
same bytes; the quick check computed during the walk is the full forward's perplexity."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import quipkit
from quipkit.cli import main
from quipkit.config import CalibrationConfig, make_config
from quipkit.eval.perplexity import perplexity, quick_protocol
from quipkit.formats import checkpoint
from quipkit.models.loading import ModelSource, load_float_model
from quipkit.models.streaming import open_streamed
from quipkit.models.synthetic import write_random_llama
from quipkit.pipeline import run_state
from quipkit.pipeline.blockwise import quantize_blockwise
from quipkit.pipeline.calibration import calibration_tokens
from quipkit.pipeline.quick_check import QuickCheck

SHAPE = (64, 3, 128, 4, 2)  # hidden, layers, intermediate, heads, kv heads
CAL = CalibrationConfig(nsamples=4, seqlen=32, batch_size=2, sources=("wikitext2",))


@pytest.fixture(scope="module")
def source(tmp_path_factory, smol_tokenizer) -> Path:
    return write_random_llama(tmp_path_factory.mktemp("stream") / "random", smol_tokenizer, SHAPE, std=0.05)


def _argv(model: Path, out: Path, method: str, bits: int, *extra: str) -> list[str]:
    return ["quantize", str(model), "--method", method, "--bits", str(bits), "--out", str(out),
            "--nsamples", str(CAL.nsamples), "--seqlen", str(CAL.seqlen), "--calib-batch", str(CAL.batch_size),
            "--calibration", "wikitext2", *extra]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_random_model_is_written_shard_by_shard_and_deterministically(tmp_path, smol_tokenizer, source):
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == SHAPE[1] + 1
    again = write_random_llama(tmp_path / "again", smol_tokenizer, SHAPE, std=0.05)
    assert _digest(again) == _digest(source)
    model, _ = load_float_model(ModelSource("hf", str(source)))
    weight = model.model.layers[1].mlp.down_proj.weight
    assert weight.shape == (64, 128) and 0.04 < float(weight.detach().std()) < 0.06


def test_streamed_run_writes_what_the_whole_model_run_writes(capsys, tmp_path, smol_tokenizer, source):
    config = make_config("gptq", 4)
    model, _ = load_float_model(ModelSource("hf", str(source)))
    quantize_blockwise(model, calibration_tokens(smol_tokenizer, CAL), config, CAL, torch.device("cpu"))
    whole = quipkit.save(model, smol_tokenizer, tmp_path / "whole", config, CAL)
    assert main(_argv(source, tmp_path / "streamed", "gptq", 4, "--no-check")) == 0
    assert "streaming" in capsys.readouterr().err
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(tmp_path / "streamed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    quant = json.loads((tmp_path / "streamed" / "config.json").read_text())["quantization_config"]
    assert quant["layers"] == json.loads((whole / "config.json").read_text())["quantization_config"]["layers"]


def test_large_checkpoints_are_sharded_per_block_and_load(tmp_path, monkeypatch, source):
    from transformers import AutoModelForCausalLM

    assert main(_argv(source, tmp_path / "one", "quip#", 2, "--no-check")) == 0
    monkeypatch.setattr(checkpoint, "SINGLE_FILE_BYTES", 0)
    assert main(_argv(source, tmp_path / "sharded", "quip#", 2, "--no-check")) == 0
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) == SHAPE[1] + 1 and not (tmp_path / "sharded" / "model.safetensors").exists()
    ids = torch.arange(20).unsqueeze(0)
    one, _ = quipkit.load(tmp_path / "one")
    sharded, _ = quipkit.load(tmp_path / "sharded")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    with torch.no_grad():
        reference = one(ids).logits
        assert torch.equal(sharded(ids).logits, reference)
        torch.testing.assert_close(plain(ids).logits, reference)
    stored = {}
    for shard in shards:
        stored.update(load_file(str(shard)))
    single = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert stored.keys() == single.keys() and all(torch.equal(stored[k], single[k]) for k in single)


def test_interrupted_streamed_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, source):
    assert main(_argv(source, tmp_path / "straight", "quip#", 2)) == 0
    real = run_state.RunState.save_block
    calls = []

    def stop_after_second(self, index, *args):
        real(self, index, *args)
        calls.append(index)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(run_state.RunState, "save_block", stop_after_second)
        assert main(_argv(source, tmp_path / "resumed", "quip#", 2)) == 130
    assert json.loads((tmp_path / "resumed.partial" / "state.json").read_text())["next_block"] == 2
    read = []
    real_materialize = type(open_streamed(source)[0]).materialize

    def spy(self, prefix="", outside=()):
        read.append(prefix)
        return real_materialize(self, prefix, outside)

    monkeypatch.setattr(type(open_streamed(source)[0]), "materialize", spy)
    assert main(_argv(source, tmp_path / "resumed", "quip#", 2)) == 0
    assert "model.layers.1" not in read and "model.layers.2" in read  # finished blocks are not read again
    assert _digest(tmp_path / "resumed") == _digest(tmp_path / "straight")
    report = json.loads((tmp_path / "resumed" / "quipkit_report.json").read_text())
    straight = json.loads((tmp_path / "straight" / "quipkit_report.json").read_text())
    assert report["resumed_from_block"] == 2 and report["check"] == straight["check"]


def test_quick_check_during_the_walk_is_the_full_forward_perplexity(smol_tokenizer, source):
    model, _ = load_float_model(ModelSource("hf", str(source)))
    proto = quick_protocol(256)
    full = perplexity(model, smol_tokenizer, proto)["perplexity"]
    check = QuickCheck(smol_tokenizer, proto)
    quantize_blockwise(model, calibration_tokens(smol_tokenizer, CAL), make_config("rtn", 4), CAL,
                       torch.device("cpu"), check=check)
    after = perplexity(model, smol_tokenizer, proto)["perplexity"]
    assert check.result["float"] == pytest.approx(full, rel=1e-6)
    assert check.result["quantized"] == pytest.approx(after, rel=1e-6)
    assert check.result["quantized"] != check.result["float"]


def test_activations_held_in_bfloat16_halve_their_memory_and_stay_close(tmp_path, monkeypatch, smol_tokenizer, source):
    model, _ = load_float_model(ModelSource("hf", str(source)))
    tokens = calibration_tokens(smol_tokenizer, CAL)
    config = make_config("gptq", 4)
    full = quantize_blockwise(model, tokens, config, CAL, torch.device("cpu"))
    half_cal = CalibrationConfig(**{**CAL.to_dict(), "activations": "bfloat16"})
    real = run_state.RunState.save_block

    def stop_after_first(self, index, *args):
        real(self, index, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_state.RunState, "save_block", stop_after_first)
    with pytest.raises(KeyboardInterrupt):
        quantize_blockwise(load_float_model(ModelSource("hf", str(source)))[0], tokens, config, half_cal,
                           torch.device("cpu"), work_folder=tmp_path / "w")
    held = load_file(str(tmp_path / "w" / "inputs_0001.safetensors"))
    assert {t.dtype for t in held.values()} == {torch.bfloat16}
    monkeypatch.setattr(run_state.RunState, "save_block", real)
    half = quantize_blockwise(load_float_model(ModelSource("hf", str(source)))[0], tokens, config, half_cal,
                              torch.device("cpu"), work_folder=tmp_path / "w")
    assert half.resumed_from_block == 1
    for a, b in zip(full.layers, half.layers):
        assert a["name"] == b["name"] and b["proxy"] == pytest.approx(a["proxy"], rel=0.1)


def test_memory_estimate_is_printed_and_a_run_that_cannot_fit_stops_naming_the_fix(source):
    from quipkit.errors import QuipkitError
    from quipkit.models.structure import find_blocks
    from quipkit.pipeline.memory import check_memory, estimate

    streamed, _ = open_streamed(source)
    _, blocks = find_blocks(streamed.model)
    config = make_config("gptq", 4)
    small = estimate(streamed.model, blocks, CAL, config, streamed=True)
    block = sum(p.numel() for p in blocks[0].parameters()) * 4
    outside = sum(p.numel() for p in streamed.model.parameters()) * 4 - block * SHAPE[1]
    assert small["weights"] == block + outside
    assert small["activations"] == 2 * CAL.nsamples * CAL.seqlen * SHAPE[0] * 4
    whole = estimate(streamed.model, blocks, CAL, config, streamed=False)
    assert whole["weights"] == block * SHAPE[1] + outside
    big = CalibrationConfig(nsamples=4096, seqlen=2048)
    half = CalibrationConfig(nsamples=4096, seqlen=2048, activations="bfloat16")
    assert estimate(streamed.model, blocks, half, config, True)["activations"] * 2 == \
        estimate(streamed.model, blocks, big, config, True)["activations"]
    assert "memory: about" in check_memory(streamed.model, blocks, CAL, config, True, available=1 << 40)
    with pytest.raises(QuipkitError, match=r"needs about .* --nsamples or --seqlen .* --offload-activations DIR .* --activations bfloat16"):
        check_memory(streamed.model, blocks, big, config, True, available=1 << 30)


def test_offloaded_activations_give_the_same_bytes_and_either_kind_of_run_resumes_the_other(tmp_path, monkeypatch,
                                                                                            source):
    from quipkit.pipeline.activations import OffloadedBatches

    assert main(_argv(source, tmp_path / "memory", "gptq", 4)) == 0  # propagates the quantized outputs
    offload = tmp_path / "offload"
    reads = []
    real_read = OffloadedBatches.__getitem__
    monkeypatch.setattr(OffloadedBatches, "__getitem__", lambda self, i: reads.append(i) or real_read(self, i))
    assert main(_argv(source, tmp_path / "disk", "gptq", 4, "--offload-activations", str(offload))) == 0
    assert _digest(tmp_path / "disk") == _digest(tmp_path / "memory")
    assert len(reads) >= 3 * SHAPE[1] * CAL.nsamples // CAL.batch_size  # every pass read its batches from disk
    assert list(offload.iterdir()) == []  # the run's folder is gone with it

    real_save = run_state.RunState.save_block

    def stop_after_first(self, index, *args):
        real_save(self, index, *args)
        raise KeyboardInterrupt

    for first, then, name in ((["--offload-activations", str(offload)], [], "a"),
                              ([], ["--offload-activations", str(offload)], "b")):
        with monkeypatch.context() as patch:
            patch.setattr(run_state.RunState, "save_block", stop_after_first)
            assert main(_argv(source, tmp_path / name, "gptq", 4, *first)) == 130
        batch_files = sorted((tmp_path / f"{name}.partial").glob("inputs_0001.batch_*.safetensors"))
        assert len(batch_files) == (CAL.nsamples // CAL.batch_size if first else 0)
        assert main(_argv(source, tmp_path / name, "gptq", 4, *then)) == 0
        assert _digest(tmp_path / name) == _digest(tmp_path / "memory")


def test_a_tied_head_is_read_through_the_embeddings(tmp_path):
    from conftest import tiny_model

    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")  # its files hold the embeddings only
    streamed, why = open_streamed(tmp_path / "tied")
    assert streamed is not None, why
    assert streamed.tied_head == "lm_head.weight" and "lm_head.weight" not in streamed.files
    assert streamed.ends() == ("model.embed_tokens", None)
    streamed.materialize("")
    assert streamed.model.lm_head.weight is streamed.model.model.embed_tokens.weight
    ids = torch.arange(12).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    streamed.release_outside("model.layers")
    assert streamed.model.lm_head.weight.is_meta and streamed.model.model.embed_tokens.weight.is_meta


def test_a_file_written_tensor_by_tensor_has_the_bytes_save_file_writes(tmp_path):
    from safetensors.torch import save_file

    from quipkit.formats.streamed_file import TensorSource, sources_in, write_safetensors

    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16, torch.int32,
              torch.float32, torch.float64, torch.int64]
    tensors = {f"{name}.{i}": (torch.randn(3, 5, generator=gen) * 100).to(dtype)
               for i, dtype in enumerate(dtypes) for name in ("w.codes", "a.b", "z")}
    tensors.update(scalar=torch.tensor(3.0), empty=torch.zeros(0, 4))
    save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    write_safetensors(tmp_path / "ours.safetensors", {k: TensorSource.held(v) for k, v in tensors.items()},
                      {"format": "pt"})
    theirs = (tmp_path / "theirs.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == theirs
    write_safetensors(tmp_path / "copied.safetensors", sources_in(tmp_path / "theirs.safetensors"), {"format": "pt"})
    assert (tmp_path / "copied.safetensors").read_bytes() == theirs


def test_an_unusable_offload_folder_is_one_line_before_any_model_loads(capsys, tmp_path, source):
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    assert main(_argv(source, tmp_path / "q", "rtn", 4, "--offload-activations", str(blocker / "sub"))) == 2
    err = capsys.readouterr().err
    assert "--offload-activations cannot use" in err and "Traceback" not in err and "streaming" not in err
