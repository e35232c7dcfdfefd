"""quipkit report: tables hold every result, the last record of a repeated run wins, plots are real PNGs."""

import json

import pytest

from quipkit.cli import main
from quipkit.eval.report import markdown, read_results


def _quality(method, bits, bpw, ppl, **extra):
    return {"bench": "quality", "method": method, "bits": bits, "bits_per_weight": bpw, "metric": "wt2-512x40 perplexity",
            "value": ppl, "seconds": 12.0, **extra}


def test_report_tables_and_plots(tmp_path, capsys):
    lines = [_quality("fp32", 32, 32.0, 28.74), _quality("gptq", 4, 4.16, 40.0), _quality("gptq", 4, 4.16, 37.5),
             _quality("quip#", 2, 2.05, 70.0, layers=[{"name": "a", "proxy": 0.1}, {"name": "b", "proxy": 0.2}]),
             _quality("qtip", 2, 2.04, 60.0, options={"L": 12}, layers=[{"name": "a", "proxy": 0.05}, {"name": "b", "proxy": 0.1}])]
    bench = tmp_path / "quality.jsonl"
    bench.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    evals = tmp_path / "eval.json"
    evals.write_text(json.dumps([{"kind": "task", "model": "m", "method": "fp32", "bits_per_weight": 32.0, "task": "piqa",
                                  "n": 10, "metrics": {"acc": {"value": 0.6, "stderr": 0.1}}},
                                 {"kind": "harness", "model": "q", "method": "quip#", "bits_per_weight": 2.05, "results": {
                                     "quipkit_piqa": {"alias": "quipkit_piqa", "sample_len": 10, "acc,none": 0.55,
                                                      "acc_stderr,none": 0.1}}}]))
    assert main(["report", str(bench), str(evals)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| gptq | 4.160 | wt2-512x40 | 37.50 |" in text and "40.00" not in text
    assert "| qtip (L=12) | 2.040 |" in text and "| fp32 | 32.000 | 60.0 |  |" in text
    assert "| piqa acc | quipkit_piqa acc |" in text and "| quip# | 2.050 |  | 55.0 |" in text  # harness results too
    for png in ("perplexity_vs_bits.png", "proxy_per_layer.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    capsys.readouterr()


def test_report_rejects_files_without_results(tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    assert main(["report", str(junk)]) != 0
    assert "neither JSON nor JSON lines" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(Exception, match="no perplexity or task results"):
        markdown(read_results([empty]))
