"""The lm-evaluation-harness adapter, offline: the harness's own configs for the bundled tasks ask
the same questions as quipkit's scorer and get the same log-likelihoods and metrics."""

import importlib.util
import json
import math

import pytest

from quipkit.cli import main
from quipkit.eval.harness import harness_task_manager, run_harness
from quipkit.eval.tasks import TASKS, encode_pair, evaluate_task, loglikelihoods

from conftest import tiny_model

LIMIT = 6


@pytest.fixture(scope="module")
def harness_run(smol_tokenizer):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.fail("lm-eval is not installed; `make test` installs it (pip install -e '.[harness]')")
    model = tiny_model(vocab_size=len(smol_tokenizer))
    names = ["quipkit_" + name for name in TASKS]
    with harness_task_manager(names) as manager:
        return model, run_harness(model, smol_tokenizer, names, manager, limit=LIMIT, log_samples=True)


@pytest.mark.parametrize("name", list(TASKS))
def test_harness_and_quipkit_agree_request_by_request(harness_run, smol_tokenizer, name):
    model, output = harness_run
    samples = sorted(output["samples"]["quipkit_" + name], key=lambda s: s["doc_id"])
    docs = TASKS[name].load()[:LIMIT]
    assert [tuple(tuple(a) for a in s["arguments"]) for s in samples] == [d.requests for d in docs]
    pairs = [encode_pair(smol_tokenizer, c, x) for d in docs for c, x in d.requests]
    ours = loglikelihoods(model, pairs)
    theirs = [tuple(r) for s in samples for r in s["filtered_resps"]]
    for (ll, greedy), (their_ll, their_greedy) in zip(ours, theirs, strict=True):
        assert ll == pytest.approx(their_ll, rel=1e-4, abs=1e-3) and greedy == their_greedy
    if name != "lambada_openai":  # the same gold answer per document
        cursor = 0
        for sample, doc in zip(samples, docs):
            lls = [ll for ll, _ in ours[cursor : cursor + len(doc.requests)]]
            cursor += len(doc.requests)
            assert sample["acc"] == float(lls.index(max(lls)) == doc.gold)
    mine = evaluate_task(model, smol_tokenizer, name, limit=LIMIT)["metrics"]
    results = output["results"]["quipkit_" + name]
    for metric, value in mine.items():
        assert value["value"] == pytest.approx(results[f"{metric},none"], rel=1e-5)


def test_cli_harness_table_json_and_unknown_task(capsys, tmp_path, smol_tokenizer):
    folder = tmp_path / "tiny"
    tiny_model(vocab_size=len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    code = main(["eval", str(folder), "--harness", "quipkit_piqa", "--limit", "4", "--json", str(tmp_path / "h.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "lm-evaluation-harness" in out and "acc_norm" in out
    row = json.loads((tmp_path / "h.json").read_text())[0]
    assert row["kind"] == "harness" and row["results"]["quipkit_piqa"]["sample_len"] == 4
    assert not math.isnan(row["results"]["quipkit_piqa"]["acc,none"])
    code = main(["eval", str(folder), "--harness", "no_such_task"])
    err = capsys.readouterr().err
    assert code != 0 and "no task no_such_task" in err and "quipkit_arc_easy" in err and "Traceback" not in err
    code = main(["eval", str(folder), "--harness", "quipkit_piqa", "--harness-include", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code != 0 and "--harness-include" in err and "Traceback" not in err
