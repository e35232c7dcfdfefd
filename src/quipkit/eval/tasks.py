"""Zero-shot tasks scored as lm-evaluation-harness scores them, on the bundled task files.

Every task is a list of documents; a document is a few (context, continuation) requests and a
gold index. A request's score is the summed log-likelihood of the continuation's tokens given the
context, with the harness's tokenization (context and context+continuation encoded without special
tokens, the continuation's tokens being the tail of the whole). Metrics:
- `acc`: the best-scoring choice is the gold one; `acc_norm`: the same after dividing each score
  by the continuation's length in characters (ARC, PIQA);
- WinoGrande: partial scoring, the option fills the blank in the context and the rest of the
  sentence is the continuation;
- LAMBADA: `acc` when every target token is the model's greedy choice, `perplexity` = exp of the
  mean negative log-likelihood of the target word over documents.
"""

from __future__ import annotations

import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from quipkit.console import Reporter
from quipkit.corpora import DATA_DIR
from quipkit.errors import QuipkitError


@dataclass(frozen=True)
class Document:
    requests: tuple[tuple[str, str], ...]  # (context, continuation) per choice
    gold: int


@dataclass(frozen=True)
class Task:
    """A bundled task: its rows in the schema of the harness's dataset, and how they become documents."""

    name: str
    rows: Callable[[], list[dict]]
    documents: Callable[[list[dict]], list[Document]]
    metrics: tuple[str, ...]
    harness_yaml: str  # the harness's own task config, relative to lm_eval/tasks
    harness_split: str  # the split the harness evaluates

    def load(self) -> list[Document]:
        return self.documents(self.rows())


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise QuipkitError(f"bundled task file {path} not found; reinstall quipkit")
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


def _question_answer(question: str, choices: list[str], gold: int) -> Document:
    return Document(tuple((f"Question: {question}\nAnswer:", f" {choice}") for choice in choices), gold)


def _arc_rows(path: Path) -> list[dict]:
    """ai2_arc rows {question, choices: {text, label}, answerKey}; the two bundled files differ in layout."""
    rows = []
    for row in _read_jsonl(path):
        if isinstance(row["question"], dict):  # AI2's original layout (ARC-Easy)
            question, options, answer = row["question"]["stem"], row["question"]["choices"], row["answerKey"]
        else:
            question, options, answer = row["question"], row["options"], row["answer"]
        choices = {"text": [o["text"] for o in options], "label": [o["label"] for o in options]}
        rows.append({"id": row["id"], "question": question, "choices": choices, "answerKey": answer})
    return rows


def _arc_documents(rows: list[dict]) -> list[Document]:
    return [_question_answer(r["question"], r["choices"]["text"], r["choices"]["label"].index(r["answerKey"])) for r in rows]


def _piqa_rows() -> list[dict]:
    rows = _read_jsonl(DATA_DIR / "piqa" / "valid.jsonl")
    labels = _labels(DATA_DIR / "piqa" / "valid-labels.lst")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label} for r, label in zip(rows, labels, strict=True)]


def _piqa_documents(rows: list[dict]) -> list[Document]:
    return [_question_answer(r["goal"], [r["sol1"], r["sol2"]], r["label"]) for r in rows]


def _winogrande_rows() -> list[dict]:
    keys = ("sentence", "option1", "option2", "answer")
    return [{k: row[k] for k in keys} for row in _read_jsonl(DATA_DIR / "winogrande" / "dev.jsonl")]


def _winogrande_documents(rows: list[dict]) -> list[Document]:
    docs = []
    for row in rows:
        sentence = row["sentence"]
        blank = sentence.index("_")
        rest = " " + sentence[blank + 1 :].strip()
        options = [row["option1"], row["option2"]]
        docs.append(Document(tuple((sentence[:blank] + option, rest) for option in options), int(row["answer"]) - 1))
    return docs


def _lambada_rows() -> list[dict]:
    return [{"text": row["text"]} for row in _read_jsonl(DATA_DIR / "lambada" / "lambada_openai_test.jsonl")]


def _lambada_documents(rows: list[dict]) -> list[Document]:
    docs = []
    for row in rows:
        context, word = row["text"].rsplit(" ", 1)
        docs.append(Document(((context, " " + word),), 0))
    return docs


TASKS = {
    "arc_easy": Task("arc_easy", lambda: _arc_rows(DATA_DIR / "arc" / "arc_easy_test.jsonl"), _arc_documents,
                     ("acc", "acc_norm"), "arc/arc_easy.yaml", "test"),
    "arc_challenge": Task("arc_challenge", lambda: _arc_rows(DATA_DIR / "arc" / "arc_challenge_test.jsonl"), _arc_documents,
                          ("acc", "acc_norm"), "arc/arc_challenge.yaml", "test"),
    "piqa": Task("piqa", _piqa_rows, _piqa_documents, ("acc", "acc_norm"), "piqa/piqa.yaml", "validation"),
    "winogrande": Task("winogrande", _winogrande_rows, _winogrande_documents, ("acc",), "winogrande/default.yaml", "validation"),
    "lambada_openai": Task("lambada_openai", _lambada_rows, _lambada_documents, ("acc", "perplexity"),
                           "lambada/lambada_openai.yaml", "test"),
}
ALIASES = {"lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def task(name: str) -> Task:
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise QuipkitError(f"unknown task '{name}'; choose from {', '.join(TASKS)}")
    return TASKS[key]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as the harness splits them: trailing spaces of the
    context move to the continuation; the continuation is the tail of encode(context + continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    return head, whole[len(head) :]


@torch.no_grad()
def loglikelihoods(
    model: nn.Module,
    pairs: list[tuple[list[int], list[int]]],
    device: torch.device | str = "cpu",
    batch_tokens: int = 4096,
    max_length: int = 2048,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per pair.

    Sequences are sorted by length and left-padded into batches of about `batch_tokens` tokens, so
    the continuation always ends the row and only its positions go through the output head.
    """
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    rows = []
    for context, continuation in pairs:
        if not continuation:
            raise QuipkitError("a request has an empty continuation")
        ids = (context + continuation)[-(max_length + 1) :][:-1]
        rows.append((ids, continuation))
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), i))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    start = 0
    while start < len(order):
        width = len(rows[order[start]][0])
        count = max(1, batch_tokens // width)
        chosen = order[start : start + count]
        start += len(chosen)
        ids = torch.zeros(len(chosen), width, dtype=torch.int64)
        mask = torch.zeros(len(chosen), width, dtype=torch.int64)
        for row, index in enumerate(chosen):
            tokens = rows[index][0]
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        span = max(len(rows[i][1]) for i in chosen)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        kwargs = {"logits_to_keep": span} if keep_logits else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, **kwargs).logits[:, -span:].float()
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        for row, index in enumerate(chosen):
            target = torch.tensor(rows[index][1])
            scores = logprobs[row, span - len(target) :]
            picked = scores.gather(1, target[:, None]).squeeze(1)
            results[index] = (float(picked.double().sum()), bool((scores.argmax(-1) == target).all()))
        if progress is not None:
            progress(len(chosen))
    return results


def _stderr(values: list[float]) -> float | None:
    """Standard error of the mean, as the harness reports it."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def evaluate_task(
    model: nn.Module,
    tokenizer,
    name: str,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    batch_tokens: int = 4096,
    reporter: Reporter | None = None,
) -> dict:
    """{task, n, seconds, metrics: {metric: {value, stderr}}} of `model` on the first `limit` documents."""
    reporter = reporter or Reporter()
    spec = task(name)
    docs = spec.load()[:limit] if limit else spec.load()
    start = time.perf_counter()
    pairs = [encode_pair(tokenizer, c, x) for doc in docs for c, x in doc.requests]
    with reporter.task(spec.name, len(pairs)) as bar:
        scores = loglikelihoods(model, pairs, device, batch_tokens, progress=bar.advance)
    per_doc: dict[str, list[float]] = {m: [] for m in spec.metrics}
    cursor = 0
    for doc in docs:
        chunk = scores[cursor : cursor + len(doc.requests)]
        cursor += len(doc.requests)
        lls = [ll for ll, _ in chunk]
        if spec.name == "lambada_openai":
            per_doc["acc"].append(float(chunk[0][1]))
            per_doc["perplexity"].append(lls[0])
            continue
        per_doc["acc"].append(float(_argmax(lls) == doc.gold))
        if "acc_norm" in per_doc:
            normed = [ll / len(x[1:]) for ll, (_, x) in zip(lls, doc.requests)]  # x is " " + choice
            per_doc["acc_norm"].append(float(_argmax(normed) == doc.gold))
    metrics = {}
    for metric, values in per_doc.items():
        if metric == "perplexity":
            metrics[metric] = {"value": math.exp(-sum(values) / len(values)), "stderr": None}
        else:
            metrics[metric] = {"value": sum(values) / len(values), "stderr": _stderr(values)}
    return {"task": spec.name, "n": len(docs), "seconds": time.perf_counter() - start, "metrics": metrics}


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's tie rule, which the harness uses)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))
