"""Zero-shot scoring: batched left-padded log-likelihoods equal one-at-a-time brute force, the
harness's tokenization split, the bundled task files parse to the right gold answers, and a run
is reproducible to the last digit."""

import json
import subprocess
import sys

import pytest
import torch

from quipkit.cli import main
from quipkit.eval.tasks import TASKS, encode_pair, evaluate_task, loglikelihoods

from conftest import tiny_model


def _brute_force(model, context, continuation):
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    picked = [logprobs[p, t] for p, t in zip(positions, continuation)]
    greedy = all(int(logprobs[p].argmax()) == t for p, t in zip(positions, continuation))
    return float(sum(picked)), greedy


def test_batched_loglikelihoods_equal_one_at_a_time():
    model = tiny_model(vocab_size=64)
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(13):
        n, m = 1 + i % 7, 1 + (i * 5) % 4
        pairs.append((torch.randint(0, 64, (n,), generator=gen).tolist(), torch.randint(0, 64, (m,), generator=gen).tolist()))
    # a continuation the model is sure to take greedily: its own argmax tokens
    context = [3, 9, 27]
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([context])).logits[0, -1].argmax())
    pairs.append((context, [nxt]))
    batched = loglikelihoods(model, pairs, batch_tokens=24)
    for (ll, greedy), (context, continuation) in zip(batched, pairs):
        want_ll, want_greedy = _brute_force(model, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-4)
        assert greedy == want_greedy
    assert batched[-1][1] is True


def test_encode_pair_moves_trailing_space_and_splits_the_whole(smol_tokenizer):
    head, tail = encode_pair(smol_tokenizer, "Question: Is the sky blue?\nAnswer: ", "yes")
    whole = smol_tokenizer("Question: Is the sky blue?\nAnswer: yes", add_special_tokens=False)["input_ids"]
    assert head + tail == whole
    assert smol_tokenizer.decode(tail) == " yes"


@pytest.mark.parametrize("name,count,first_gold", [
    ("arc_easy", 2376, 0), ("arc_challenge", 1172, 2), ("piqa", 1838, 0), ("winogrande", 1267, 1), ("lambada_openai", 5153, 0),
])
def test_bundled_tasks_parse_with_their_gold_answers(name, count, first_gold):
    docs = TASKS[name].load()
    assert len(docs) == count and docs[0].gold == first_gold
    assert all(0 <= d.gold < len(d.requests) for d in docs)
    if name == "winogrande":  # partial scoring: the option ends the context, the rest is shared
        (c1, x1), (c2, x2) = docs[0].requests
        assert c1.endswith("Sarah") and c2.endswith("Maria") and x1 == x2 == " always got the easier cases."
    if name == "lambada_openai":
        assert docs[0].requests[0][1] == " signs"


def test_task_run_is_reproducible_and_cli_writes_json(tmp_path, capsys, smol_tokenizer):
    model = tiny_model(vocab_size=len(smol_tokenizer))
    first = evaluate_task(model, smol_tokenizer, "arc_easy", limit=12)
    second = evaluate_task(model, smol_tokenizer, "arc_easy", limit=12)
    assert first["metrics"] == second["metrics"] and first["n"] == 12
    assert 0.0 <= first["metrics"]["acc"]["value"] <= 1.0
    lam = evaluate_task(model, smol_tokenizer, "lambada_openai", limit=4)
    assert lam["metrics"]["perplexity"]["value"] > 1.0
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    code = main(["eval", str(folder), "--tasks", "arc_easy,winogrande", "--limit", "12", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["task"] for r in rows] == ["arc_easy", "winogrande"]
    assert rows[0]["metrics"] == first["metrics"] and rows[0]["method"] == "fp32"
    assert main(["eval", str(folder), "--tasks", "hellaswag"]) != 0
    assert "unknown task 'hellaswag'" in capsys.readouterr().err


# the reference model end to end in two processes: 2.5 min on a 2-core Zen 3
@pytest.mark.slow
def test_reference_model_scores_the_same_digits_in_two_processes(tmp_path):
    """The real SmolLM2 on PIQA, two separate runs of the CLI: every digit of every metric agrees."""
    outputs = []
    for run in range(2):
        out = tmp_path / f"run{run}.json"
        done = subprocess.run([sys.executable, "-m", "quipkit.cli", "eval", "smollm2-135m", "--tasks", "piqa",
                               "--limit", "48", "--json", str(out)], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(out.read_text())[0])
    first, second = outputs
    assert first["n"] == 48 and first["metrics"] == second["metrics"]
    assert 0.5 < first["metrics"]["acc"]["value"] < 0.9  # a real model, above chance on PIQA
