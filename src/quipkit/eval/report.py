"""Turn bench/eval result files into a Markdown report and PNG plots.

Reads JSON lines from `bench/quality.py` and JSON lists from `quipkit eval --json`; writes
`report.md` (perplexity and zero-shot tables), `perplexity_vs_bits.png` (one line per method per
protocol, the float reference as a dashed line) and `proxy_per_layer.png` (relative proxy loss of
every layer, one line per method at the chosen bits).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from quipkit.errors import QuipkitError, missing_dependency
from quipkit.eval.harness import harness_metrics
from quipkit.formats.atomic import atomic_write_text

FLOAT = "fp32"


def read_results(paths: list[Path]) -> list[dict[str, Any]]:
    """Every result record in `paths` (JSON list, JSON object, or JSON lines)."""
    records: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            raise QuipkitError(f"result file {path} not found")
        text = path.read_text()
        try:
            data = json.loads(text)
            items = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            try:
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise QuipkitError(f"{path} is neither JSON nor JSON lines ({err.msg} at line {err.lineno})") from None
        records.extend(item for item in items if isinstance(item, dict))
    return records


def perplexity_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, bits per weight, protocol, options) with its perplexity; the last record wins."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("bench") == "quality":
            proto = r["metric"].removesuffix(" perplexity")
            row = {"method": _label(r), "bits_per_weight": r["bits_per_weight"], "protocol": proto, "perplexity": r["value"],
                   "seconds": r.get("seconds")}
        elif r.get("kind") == "perplexity":
            row = {"method": r.get("method", r.get("model")), "bits_per_weight": r.get("bits_per_weight"),
                   "protocol": r["protocol"], "perplexity": r["perplexity"], "seconds": None}
        else:
            continue
        rows[(row["method"], round(row["bits_per_weight"] or 0, 3), row["protocol"])] = row
    return sorted(rows.values(), key=lambda row: (row["protocol"], row["method"] != FLOAT, row["method"], row["bits_per_weight"] or 0))


def _label(record: dict[str, Any]) -> str:
    """'qtip' or 'qtip (L=12)': a method name with the preset options that were changed."""
    options = record.get("options") or {}
    shown = {k: v for k, v in options.items() if k not in ("propagate",)}
    return record["method"] + (" (" + ", ".join(f"{k}={v}" for k, v in sorted(shown.items())) + ")" if shown else "")


def task_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns 'task metric', one row per evaluated model with its scores from `--tasks` or `--harness`)."""
    columns: list[str] = []
    models: dict[tuple, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") == "task":
            scores = [(r["task"], metric, value["value"]) for metric, value in r["metrics"].items()]
        elif r.get("kind") == "harness":
            scores = [(name, metric, value) for name, metric, value, _ in harness_metrics(r["results"])]
        else:
            continue
        key = (r.get("method"), r.get("model"))
        row = models.setdefault(key, {"method": r.get("method"), "model": r.get("model"),
                                      "bits_per_weight": r.get("bits_per_weight"), "scores": {}})
        for name, metric, value in scores:
            column = f"{name} {metric}"
            if column not in columns:
                columns.append(column)
            row["scores"][column] = value
    return columns, sorted(models.values(), key=lambda row: -(row["bits_per_weight"] or 0))


def markdown(records: list[dict[str, Any]]) -> str:
    lines = ["# quipkit results", ""]
    ppl = perplexity_rows(records)
    if ppl:
        lines += ["## Perplexity", "", "| method | bits/weight | protocol | perplexity | quantization (s) |", "|---|---:|---|---:|---:|"]
        for row in ppl:
            seconds = f"{row['seconds']:.0f}" if row["seconds"] else ""
            lines.append(f"| {row['method']} | {row['bits_per_weight']:.3f} | {row['protocol']} | {row['perplexity']:.2f} | {seconds} |")
        lines.append("")
    columns, models = task_rows(records)
    if models:
        lines += ["## Zero-shot (lm-evaluation-harness conventions)", "",
                  "| model | bits/weight | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
        for row in models:
            cells = [_cell(row["scores"].get(c)) for c in columns]
            lines.append(f"| {row['method']} | {row['bits_per_weight']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(lines) == 2:
        raise QuipkitError("no perplexity or task results in these files (expected bench/quality.py or quipkit eval --json output)")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value > 1.5 else f"{100 * value:.1f}"


def plot_perplexity(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against bits per weight, one line per method, per protocol: all of it on a log scale,
    and beside it the part within 3x of float (linear), where the methods worth comparing are."""
    plt = _pyplot()
    protocols = sorted({row["protocol"] for row in rows})
    fig, axes = plt.subplots(len(protocols), 2, figsize=(17, 5 * len(protocols)), squeeze=False)
    for (whole, near), proto in zip(axes, protocols):
        by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in rows:
            if row["protocol"] == proto:
                by_method[row["method"]].append((row["bits_per_weight"], row["perplexity"]))
        float_ppl = by_method[FLOAT][0][1] if FLOAT in by_method else None
        for ax in (whole, near):
            for i, (method, points) in enumerate(sorted(by_method.items())):
                if method == FLOAT:
                    ax.axhline(points[0][1], color="black", linestyle="--", linewidth=1, label=f"fp32 ({points[0][1]:.2f})")
                    continue
                points.sort()
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method, **_style(i))
            ax.set_xlabel("bits per weight (as stored)")
            ax.grid(True, which="both", alpha=0.3)
        whole.set_yscale("log")
        whole.set_ylabel(f"{proto} perplexity (log scale)")
        whole.set_title(proto)
        near.set_ylabel(f"{proto} perplexity")
        if float_ppl is not None:
            near.set_ylim(0.95 * float_ppl, 3 * float_ppl)
            near.set_title(f"{proto}: within 3x of float")
        _legend_beside(near)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_proxy(records: list[dict[str, Any]], bits: int, path: Path) -> bool:
    """Relative proxy loss of each layer in model order, one line per method at `bits`; False if none."""
    chosen = [r for r in records if r.get("bench") == "quality" and r.get("bits") == bits and r.get("layers")]
    if not chosen:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(14, 5))
    seen = set()
    for r in chosen:
        label = _label(r)
        if label in seen:
            continue
        ax.plot([layer["proxy"] for layer in r["layers"]], linewidth=1, label=label, **_style(len(seen)))
        seen.add(label)
    ax.set_yscale("log")
    ax.set_xlabel("linear layer (model order)")
    ax.set_ylabel("relative proxy loss tr(E H E^T)/tr(W H W^T)")
    ax.set_title(f"proxy loss per layer at {bits} bits")
    ax.grid(True, which="both", alpha=0.3)
    _legend_beside(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _style(index: int) -> dict[str, str]:
    """The line style of the index-th line: the color cycle repeats after 10, so each round of it
    gets its own dash pattern and the lines stay apart."""
    return {"linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


def _legend_beside(ax) -> None:
    """The legend right of the axes, where it hides no point (there are 20 methods and more)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_dependency("matplotlib", "the plots of quipkit report") from None
    return plt


def write_report(paths: list[Path], out_dir: Path | None = None, proxy_bits: int = 2) -> list[Path]:
    """Write report.md and the plots next to the first result file (or into `out_dir`); their paths."""
    records = read_results(paths)
    out = out_dir or paths[0].parent
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(records)
    written = [out / "report.md"]
    rows = [row for row in perplexity_rows(records) if row["bits_per_weight"] and math.isfinite(row["perplexity"])]
    if rows:
        plot_perplexity(rows, out / "perplexity_vs_bits.png")
        written.append(out / "perplexity_vs_bits.png")
        text += "\n![perplexity vs bits per weight](perplexity_vs_bits.png)\n"
    if plot_proxy(records, proxy_bits, out / "proxy_per_layer.png"):
        written.append(out / "proxy_per_layer.png")
        text += "\n![proxy loss per layer](proxy_per_layer.png)\n"
    atomic_write_text(out / "report.md", text)
    return written
