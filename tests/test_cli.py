"""Every user error ends in one line naming the problem and the fix, with a non-zero exit; no traceback."""

import json

import pytest
import torch

from quipkit.cli import EXIT_USER_ERROR, main

from conftest import tiny_model


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == EXIT_USER_ERROR
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("quipkit: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smol_tokenizer):
    """A tiny Llama with the real tokenizer, saved like a Hugging Face model folder."""
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_model(vocab_size=len(smol_tokenizer))
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def test_unknown_method(capsys, tmp_path):
    code, _, err = _run(capsys, "quantize", "--method", "quip##", "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "unknown method 'quip##'", "gptq")


def test_bad_bits(capsys, tmp_path):
    code, _, err = _run(capsys, "quantize", "--method", "quip#", "--bits", "5", "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "does not support 5 bits", "2, 3, 4")


def test_missing_model_path(capsys, tmp_path):
    code, _, err = _run(capsys, "quantize", "./no/such/model", "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "no such file or folder")


def test_output_exists(capsys, tmp_path):
    (tmp_path / "o").mkdir()
    code, _, err = _run(capsys, "quantize", "--out", str(tmp_path / "o"))
    _assert_one_line_error(code, err, "already exists", "--overwrite")


def test_foreign_and_corrupt_checkpoints(capsys, tmp_path, tiny_folder):
    code, _, err = _run(capsys, "info", str(tiny_folder))
    _assert_one_line_error(code, err, "not a quipkit checkpoint")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    code, _, err = _run(capsys, "info", str(broken))
    _assert_one_line_error(code, err, "corrupt")
    code, _, err = _run(capsys, "eval", str(broken))
    _assert_one_line_error(code, err, "not valid JSON")


def test_unknown_protocol(capsys):
    code, _, err = _run(capsys, "eval", "--ppl", "wikitext3")
    _assert_one_line_error(code, err, "unknown perplexity protocol 'wikitext3'")


def test_model_without_linear_layers(capsys, tmp_path, smol_tokenizer):
    import transformers

    # GPT-2 computes with Conv1D modules, not nn.Linear: there is nothing quipkit can quantize
    folder = tmp_path / "gpt2"
    cfg = transformers.GPT2Config(vocab_size=len(smol_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    code, _, err = _run(capsys, "quantize", str(folder), "--method", "gptq", "--out", str(tmp_path / "o"),
                        "--nsamples", "2", "--seqlen", "16")
    _assert_one_line_error(code, err, "no repeated blocks of linear layers")


def test_quantize_info_eval_generate_end_to_end(capsys, tmp_path, tiny_folder):
    out = tmp_path / "q"
    code, _, err = _run(capsys, "quantize", str(tiny_folder), "--method", "gptq", "--bits", "4", "--group-size", "32",
                        "--out", str(out), "--nsamples", "4", "--seqlen", "32", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    assert not (tmp_path / "q.partial").exists()
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["method"] == "gptq" and len(summary["layers"]) == 14
    check = summary["check"]  # the quick perplexity check runs by default, on the float and the quantized model
    assert check["protocol"] == "wt2-256x4" and check["float"] > 1 and check["quantized"] > 1
    assert check["quantized"] != check["float"] and isinstance(summary["warnings"], list)
    assert all({"damping", "dead_inputs", "warnings"} <= set(layer) for layer in summary["layers"])
    assert summary["account"]["quantized_share"] > 0.99 and summary["warnings"] == []
    assert summary["account"]["quantized_bits_per_weight"] == pytest.approx(summary["bits_per_weight"])
    code, out_text, _ = _run(capsys, "info", str(out), "--json")
    info = json.loads(out_text)
    assert code == 0 and info["method"] == "gptq" and info["layers"] == 14
    assert info["quantized_share"] == pytest.approx(summary["account"]["quantized_share"])
    assert info["bits_per_weight"] == pytest.approx(summary["bits_per_weight"])
    code, out_text, _ = _run(capsys, "generate", str(out), "Hello", "--max-new-tokens", "4", "--no-chat")
    assert code == 0 and isinstance(out_text, str)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    code, _, err = _run(capsys, "eval", str(out), "--ppl", str(text), "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())[0]
    assert result["perplexity"] > 1 and result["windows"] >= 1
    assert result["method"] == "gptq" and 4 < result["bits_per_weight"] < 5  # labelled for `quipkit report`


def test_method_options_reach_the_config():
    from quipkit.cli import _build_configs, build_parser

    args = build_parser().parse_args(["quantize", "--method", "gptq", "--bits", "3", "--incoherence", "--out", "x"])
    assert _build_configs(args)[0].transform == {"name": "kronecker", "rescale": True}
    args = build_parser().parse_args(["quantize", "--method", "quip", "--bits", "2", "--order", "rg", "--out", "x"])
    assert _build_configs(args)[0].act_order is True
    args = build_parser().parse_args(["quantize", "--method", "gptq", "--bits", "2", "--incoherence", "--no-clip", "--out", "x"])
    assert _build_configs(args)[0].codebook["clip"] is False
    args = build_parser().parse_args(["quantize", "--method", "qtip", "--bits", "2", "--L", "12", "--out", "x"])
    assert _build_configs(args)[0].codebook["L"] == 12
    args = build_parser().parse_args(["quantize", "--method", "caldera", "--bits", "2", "--rank", "16", "--lr-bits", "16",
                                      "--outer-iters", "2", "--base", "qtip", "--out", "x"])
    config = _build_configs(args)[0]
    assert config.low_rank["rank"] == 16 and config.low_rank["outer_iters"] == 2
    assert config.low_rank["codebook"] == {"name": "dense", "bits": 16} and config.codebook["name"] == "trellis"
    args = build_parser().parse_args(["quantize", "--method", "icquant", "--bits", "2", "--inliers", "table", "--out", "x"])
    assert _build_configs(args)[0].codebook["inliers"] == "table"


def test_overrides_and_blocks_reach_the_config(capsys):
    from quipkit.cli import _build_configs, build_parser

    args = build_parser().parse_args(["quantize", "--method", "quip#", "--bits", "2", "--out", "x", "--blocks",
                                      "model.language_model.layers", "--override", "self_attn=quip#:4",
                                      "--override", r"shared_experts\.=:3"])
    config = _build_configs(args)[0]
    assert config.blocks == "model.language_model.layers"
    assert config.for_layer("model.layers.0.self_attn.q_proj").bits == 4
    assert config.for_layer("model.layers.0.mlp.shared_experts.up_proj").bits == 3
    assert config.for_layer("model.layers.0.mlp.experts.gate_up.1").bits == 2
    code, _, err = _run(capsys, "quantize", "--override", "self_attn", "--out", "x")
    _assert_one_line_error(code, err, "must look like REGEX=METHOD:BITS")


def test_every_commands_help_prints(capsys):
    from quipkit.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in commands:
        with pytest.raises(SystemExit) as done:
            parser.parse_args([name, "--help"])
        assert done.value.code == 0, name
        assert "usage:" in capsys.readouterr().out


def test_quantize_with_both_fine_tuning_stages_records_them_and_info_shows_them(capsys, tmp_path, tiny_folder):
    out = tmp_path / "ft"
    code, _, err = _run(capsys, "quantize", str(tiny_folder), "--method", "quip#", "--bits", "2", "--out", str(out),
                        "--nsamples", "8", "--seqlen", "32", "--calib-batch", "2", "--finetune", "all",
                        "--ft-epochs", "1", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    assert not (tmp_path / "ft.finetune").exists() and not (tmp_path / "ft.partial").exists()
    block, e2e = json.loads((tmp_path / "s.json").read_text())["finetune"]
    assert block["stage"] == "block" and [b["block"] for b in block["blocks"]] == [0, 1]
    assert all(b["held_out_mse_after"] <= b["held_out_mse_before"] for b in block["blocks"])
    assert e2e["stage"] == "e2e" and e2e["steps"] >= 1 and e2e["trained_layers"] == 14
    assert e2e["held_out_kl_after"] <= e2e["held_out_kl_before"]
    code, out_text, _ = _run(capsys, "info", str(out), "--json")
    shown = json.loads(out_text)["finetune"]
    assert code == 0 and shown[1]["held_out_kl_after"] == e2e["held_out_kl_after"] and shown[0]["blocks"] == block["blocks"]
    code, out_text, _ = _run(capsys, "info", str(out))
    assert code == 0 and "block fine-tuning" in out_text


def test_fine_tuning_without_calibration_is_refused(capsys, tmp_path, tiny_folder):
    code, _, err = _run(capsys, "quantize", str(tiny_folder), "--method", "rtn", "--bits", "4",
                        "--out", str(tmp_path / "x"), "--finetune", "e2e")
    _assert_one_line_error(code, err, "--finetune", "rtn")
    code, _, err = _run(capsys, "quantize", str(tiny_folder), "--method", "quip#", "--bits", "2",
                        "--out", str(tmp_path / "x"), "--finetune", "e2e", "--ft-lr", "-1")
    _assert_one_line_error(code, err, "lr > 0")
