"""Quantize a causal LM block by block with bounded memory.

For each decoder block: move it to the device, run the calibration activations through it with
Hessian hooks on its linears, quantize every selected linear (layers reading the same input
together), swap in QuantizedLinear, and compute the next block's inputs, from the original block
(`propagate="original"`, the outputs of the pass that collected the Hessians) or from the
quantized one (`"quantized"`, one more pass). Memory stays at one block plus the activations of
the calibration set. With a work folder, each finished block is saved so a rerun resumes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quipkit.config import CalibrationConfig, QuantConfig
from quipkit.console import Reporter
from quipkit.errors import QuipkitError
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.structure import find_blocks, select_linears, set_module
from quipkit.models.experts import unfuse_experts
from quipkit.models.streaming import StreamedModel
from quipkit.pipeline.activations import ActivationFolder, OffloadedBatches
from quipkit.pipeline.capture import capture_block_calls, compute_dtype, move, run_block
from quipkit.pipeline.distributed import Ranks
from quipkit.pipeline.expert_hessians import complete_expert_hessians, is_expert
from quipkit.pipeline.head import compress_head, rounds_head, stored_embedding_dtype
from quipkit.pipeline.finetune import FinetuneOptions, finetune_block
from quipkit.pipeline.guided import output_gradient_weights
from quipkit.pipeline.hessian_cache import HessianCache, HessianGroups, cacheable, weight_signature
from quipkit.formats.checkpoint import state_tensors
from quipkit.pipeline.layer_group import LayerRecord, quantize_group
from quipkit.pipeline.quick_check import QuickCheck
from quipkit.pipeline.run_state import RunState, fingerprint_of
from quipkit.rounding import HessianAccumulator
from quipkit.rounding.hessian import RowGroupAccumulator


@dataclass
class QuantizeReport:
    """Per-layer records and the wall time of each stage, in seconds."""

    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=lambda: {"capture": 0.0, "hessian": 0.0, "rounding": 0.0, "propagate": 0.0})
    resumed_from_block: int = 0
    head: dict[str, Any] | None = None  # the output head's record when it was quantized (head_bits 8/6/4)
    block_files: list[Path] = field(default_factory=list)  # with a work folder: each block's checkpoint tensors
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)  # with a work folder: the blocks' layer specs
    block_finetune: list[dict[str, Any]] = field(default_factory=list)  # per block: held-out MSE before and after

    def bits_per_weight(self) -> float:
        weights = sum(r["shape"][0] * r["shape"][1] for r in self.layers)
        return sum(r["bits"] * r["shape"][0] * r["shape"][1] for r in self.layers) / max(weights, 1)


class _StopBlock(Exception):
    pass


class _HessianHooks:
    """Forward pre-hooks that accumulate H per distinct input; linears fed the same tensor share one H.

    With `stop_at`, the block's forward is cut short right after that linear's input is recorded. With
    `first_only`, only the first group (and experts) accumulate: the others are found but not summed.
    """

    def __init__(self, linears: dict[str, nn.Linear], device: torch.device, stop_at: str | None = None,
                 first_only: bool = False, guide: dict[str, Tensor] | None = None) -> None:
        self.linears = linears
        self.device = device
        self.stop_at = stop_at
        self.first_only = first_only
        self.guide = guide  # guided Hessians: {name: [N, T, G] token weights}; each linear is its own group
        self._sequence = 0  # the first calibration sequence of the batch running now
        self._batch_rows = 0
        self.groups: list[list[str]] = []  # names that read one input, found on the first batch
        self.accumulators: dict[str, HessianAccumulator] = {}
        self._seen: list[tuple[Tensor, str]] = []  # (input, first reader), alive during a batch
        self._first_batch = True
        self._names: set[str] = set()  # every name in `groups`
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._first_batch:
                owner = next((first for seen, first in self._seen if seen is x), None) if self.guide is None else None
                self._names.add(name)
                if owner is None:
                    self._seen.append((x, name))
                    if self.wanted(len(self.groups), name):
                        self.accumulators[name] = self.new_accumulator(name, x.shape[-1])
                    self.groups.append([name])
                else:
                    next(g for g in self.groups if g[0] == owner).append(name)
                    return
            elif name not in self._names:  # first called on a later batch: an expert no token reached before
                self._names.add(name)
                self.groups.append([name])
                self.accumulators[name] = self.new_accumulator(name, x.shape[-1])
            if name in self.accumulators and self.guide is None:
                self.accumulators[name].add(x)
            elif name in self.accumulators:
                self._batch_rows = x.shape[0]
                weights = self.guide[name][self._sequence:self._sequence + x.shape[0]]
                self.accumulators[name].add(x, weights.reshape(-1, weights.shape[-1]))
            if name == self.stop_at:
                raise _StopBlock

        return hook

    def new_accumulator(self, name: str, size: int) -> HessianAccumulator | RowGroupAccumulator:
        """An empty sum for `name`'s input of `size` features: one, or (guided) one per group of its rows."""
        if self.guide is None:
            return HessianAccumulator(size, self.device)
        return RowGroupAccumulator(size, self.guide[name].shape[-1], self.device)

    def wanted(self, index: int, name: str) -> bool:
        """Whether the group at `index` in forward order, first read by `name`, is summed."""
        return not self.first_only or index == 0 or is_expert(name)

    def end_batch(self) -> None:
        self._first_batch = False
        self._sequence += self._batch_rows
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


Batches = list[Tensor] | OffloadedBatches  # hidden states per calibration batch, in memory or on disk


def _waiting(space: ActivationFolder | None) -> Batches:
    """An empty sequence for a pass's outputs: a list, or files in `space` when offloading."""
    return space.batches() if space is not None else []


def _shared_run(block: nn.Module, inputs: Batches, kwargs: list[dict], device: torch.device, ranks: Ranks,
                after=None, space: ActivationFolder | None = None) -> Batches:
    """The block's outputs for every batch (held in the inputs' dtype, in memory or in `space`), each
    process running its share."""
    share = ranks.share(len(inputs))
    store = (inputs.dtype if isinstance(inputs, OffloadedBatches) else inputs[0].dtype) if len(inputs) else None
    mine = run_block(block, inputs[share.start:share.stop], kwargs[share.start:share.stop], device, after, store,
                     into=_waiting(space))
    return ranks.gather(mine)


def _merged(hooks: _HessianHooks, ranks: Ranks, sizes: dict[str, int]) -> tuple[list[list[str]], dict[str, HessianAccumulator]]:
    """The groups every process found (in the first process's order, then others' late experts) and
    the accumulators of those the hooks sum, summed over the processes."""
    groups: list[list[str]] = []
    for found in ranks.gather([hooks.groups]):  # one list of groups per process
        groups += [group for group in found if group[0] not in {g[0] for g in groups}]
    accumulators = {}
    for index, group in enumerate(groups):
        if not hooks.wanted(index, group[0]):
            continue
        own = hooks.accumulators.get(group[0]) or hooks.new_accumulator(group[0], sizes[group[0]])
        accumulators[group[0]] = ranks.merge(own)
    return groups, accumulators


def collect_hessians(
    block: nn.Module, linears: dict[str, nn.Linear], inputs: Batches, kwargs: list[dict], device: torch.device,
    ranks: Ranks | None = None, first_only: bool = False, space: ActivationFolder | None = None,
    guide: dict[str, Tensor] | None = None,
) -> tuple[Batches, list[tuple[list[str], Tensor | None]], dict[str, str]]:
    """Run the block on every batch: (outputs, [(names reading one input, E[x x^T] of it)] in forward
    order, {expert name: how its Hessian was completed} for experts that saw too few tokens). With
    `first_only`, groups after the first (experts excepted) come with None: each is collected when its
    turn comes, as holding them all meanwhile cost a 7B block 2 GB. With `guide` (guided Hessians),
    every linear is its own group and its Hessian is [G, n, n]."""
    ranks = ranks or Ranks()
    hooks = _HessianHooks(linears, device, first_only=first_only, guide=guide)
    try:
        outputs = _shared_run(block, inputs, kwargs, device, ranks, after=hooks.end_batch, space=space)
    finally:
        hooks.remove()
    sizes = {n: lin.in_features for n, lin in linears.items()}
    names, accumulators = _merged(hooks, ranks, sizes)
    tokens = {first: accumulator.tokens for first, accumulator in accumulators.items()}
    groups = [(group, accumulators[group[0]].pop_mean() if group[0] in accumulators else None)
              for group in names]  # each sum becomes its mean
    groups, notes = complete_expert_hessians(groups, tokens, sizes)
    return outputs, groups, notes


def _hessian_at(block: nn.Module, name: str, linear: nn.Linear, inputs: Batches, kwargs: list[dict],
                device: torch.device, ranks: Ranks, guide: dict[str, Tensor] | None = None) -> Tensor:
    """H of `linear`'s input in the block as it is now, running each batch only as far as that layer."""
    hooks = _HessianHooks({name: linear}, device, stop_at=name, guide=guide)
    share = ranks.share(len(inputs))
    compute = compute_dtype(block)
    try:
        for x, kw in zip(inputs[share.start:share.stop], kwargs[share.start:share.stop]):
            try:
                block(x.to(device, compute), **move(kw, device))
            except _StopBlock:
                pass
            hooks.end_batch()
    finally:
        hooks.remove()
    own = hooks.accumulators.get(name) or hooks.new_accumulator(name, linear.in_features)
    return ranks.merge(own).pop_mean()


@torch.no_grad()
def quantize_blockwise(
    model: nn.Module,
    tokens: Tensor,
    config: QuantConfig,
    calibration: CalibrationConfig,
    device: torch.device,
    reporter: Reporter | None = None,
    work_folder: Path | None = None,
    model_id: str = "",
    hessian_cache: Path | None = None,
    streamed: StreamedModel | None = None,
    check: QuickCheck | None = None,
    offload: Path | None = None,
    block_finetune: FinetuneOptions | None = None,
) -> QuantizeReport:
    """Quantize `model` in place on calibration `tokens` [N, T]; returns what was done.

    With `hessian_cache`, a folder shared between runs: Hessians found there complete are used
    without any forward pass; otherwise this run's are stored there for the next one.

    With `streamed` (whose skeleton `model` is), each block's weights are read from disk just before
    it is quantized and released once its shard is in `work_folder` (required then): memory holds one
    block. Finished blocks of a resumed streamed run are not read at all. With `check`, the quick
    perplexity check's windows travel through each block, float before and quantized after. With
    `offload`, a folder, the calibration activations wait there between passes, one file per batch.
    With `block_finetune`, each block's continuous parameters are trained after its rounding to
    reproduce the float block's outputs (pipeline/finetune.py); the blocks are then run even when
    cached Hessians would spare it, to have those outputs.
    """
    reporter = reporter or Reporter()
    report = QuantizeReport()
    ranks = Ranks()
    prefix, blocks = find_blocks(model, config.blocks)
    model.eval()
    if streamed is None:
        unfused = unfuse_experts(model)  # one linear per expert matrix, so every expert is quantized
        if unfused:
            reporter.log(f"experts: {len(unfused)} fused modules unfused into one linear per expert matrix")
    elif work_folder is None:
        raise QuipkitError("a streamed model needs a work folder to write its blocks into")
    if block_finetune is not None and (ranks.active or not config.needs_calibration):
        raise QuipkitError("block fine-tuning runs in one process on a calibrated method; drop --nproc, or use "
                           "--finetune e2e")
    # the model by its name and its weights' content: another file under the same name never resumes
    weights = None
    if work_folder is not None or hessian_cache is not None:
        weights = streamed.signature() if streamed is not None else weight_signature(model)
    state = None
    if work_folder is not None:
        parts = {} if block_finetune is None else {"block_finetune": asdict(block_finetune)}
        fingerprint = fingerprint_of(config=config.to_dict(), calibration=calibration.to_dict(), model=model_id,
                                     weights=weights, check=check is not None, **parts)
        if not ranks.leader:
            ranks.barrier()  # the leader opens (and cleans) the work folder first
        state = RunState.open(work_folder, fingerprint, writer=ranks.leader)
    space = ActivationFolder(offload, str(work_folder or model_id), ranks.rank, ranks.leader) if offload else None
    if work_folder is not None and ranks.leader:
        ranks.barrier()
    if not ranks.leader:
        check = None  # the leader runs the quick check
    cache = None
    if hessian_cache is not None and cacheable(config):
        identity = {"model": model_id, "weights": weights, "calibration": calibration.to_dict()}
        cache = HessianCache(hessian_cache, identity, len(blocks), head=rounds_head(model, config))
    elif hessian_cache is not None:
        reporter.log("not using the Hessian cache: this method's Hessians depend on its own quantized layers")
    use_cache = cache is not None and cache.complete
    if use_cache:
        reporter.log(f"using cached Hessians from {cache.folder}")
    calibrated = config.needs_calibration and (not use_cache or block_finetune is not None)
    guide = None
    if config.needs_calibration and not use_cache and calibration.hessian == "guided":
        guide = _guided_weights(model, blocks, prefix, tokens, calibration, device, streamed, ranks, reporter)
    first = state.next_block if state is not None else 0
    start = time.perf_counter()
    batches = list(torch.split(tokens, calibration.batch_size)) if calibrated else []
    calls, inputs = None, _waiting(space)
    if calibrated or check is not None:
        calls, check_inputs = _capture(model, blocks, prefix, batches, check, config.head_bits, streamed)
        captured, calls.inputs = calls.inputs[: len(batches)], calls.inputs[len(batches):]
        if check is not None:
            check.start(calls.inputs, check_inputs)
        if not (state is not None and state.resuming):
            held = getattr(torch, calibration.activations)  # the dtype activations wait in between blocks
            while captured:
                inputs.append(captured.pop(0).to(held))
    report.seconds["capture"] += time.perf_counter() - start
    if state is not None and state.resuming:
        if streamed is None:
            _restore_blocks(model, state, first)
        inputs, extra = state.load_inputs(space)
        if check is not None:
            check.restore(extra)
        report.layers.extend(state.records)
        report.block_finetune.extend(state.block_finetune)
        report.resumed_from_block = first
        reporter.log(f"resuming from block {first} of {len(blocks)} ({work_folder})")
    with reporter.task("blocks", len(blocks)) as block_task:
        block_task.advance(first)
        for index in range(first, len(blocks)):
            name = f"{prefix}.{index}"
            if streamed is not None:
                streamed.materialize(name)
            block = blocks[index].to(device)
            linears = select_linears(block, name, config.include, config.exclude)
            # a cache serves runs with any include/exclude, so it holds every linear's Hessian
            observed = select_linears(block, name, (), ()) if cache is not None else linears
            kwargs = calls.kwargs[index][: len(batches)] if calls is not None else []
            if check is not None:
                check.before(block, calls.kwargs[index][len(batches):], device)
            cached = cache.load(index) if use_cache else None
            previous = inputs
            inputs, saved, records, groups, tuned = _quantize_block(
                block, linears, inputs, kwargs, config, device, reporter, report, cached, observed, ranks,
                keep_hessians=cache is not None and not use_cache, space=space, finetune=block_finetune,
                guide=guide,
            )
            if tuned is not None:
                tuned = {"block": index, **tuned}
                report.block_finetune.append(tuned)
                reporter.log(f"block {index} fine-tuned: held-out MSE {tuned['held_out_mse_before']:.5f} -> "
                             f"{tuned['held_out_mse_after']:.5f}")
            if check is not None:
                check.after(block, calls.kwargs[index][len(batches):], device)
            if cache is not None and not use_cache and ranks.leader:
                cache.save(index, groups)
            blocks[index] = block.to("cpu") if device.type != "cpu" else block
            report.layers.extend(r.to_dict() for r in records)
            if state is not None and ranks.leader:
                specs = {layer: spec for layer, (spec, _) in saved.items()}
                state.save_block(index, state_tensors(blocks[index], name), specs, [r.to_dict() for r in records],
                                 inputs, check.state() if check is not None else {}, tuned)
            if streamed is not None:
                streamed.release(name)
            if previous is not inputs:
                _let_go(previous, ranks)
            del previous
            worst = max((r.proxy for r in records), default=0.0)
            block_task.advance(1, status=f"worst proxy {worst:.4f}")
    if not report.layers:
        raise QuipkitError(
            "no linear layer matched the include/exclude patterns; nothing was quantized "
            f"(blocks are '{prefix}.N', e.g. '{prefix}.0.mlp.down_proj')"
        )
    if not ranks.leader:  # the rest (head, embeddings, the checkpoint) is the leader's
        return report
    start = time.perf_counter()
    returns_tuple = calls.returns_tuple if calls is not None else False
    head_batches = batches or (list(torch.split(tokens, calibration.batch_size)) if tokens.numel() else [])
    head = _outside_blocks(model, blocks, prefix, config, device, head_batches,
                           inputs if calibrated and inputs else None, returns_tuple, streamed, check, cache)
    report.head = head.to_dict() if head is not None else None
    report.seconds["head"] = time.perf_counter() - start
    if space is not None:
        space.remove()
    if state is not None:
        report.specs, report.block_files = dict(state.specs), state.block_files()
    return report


def _capture(model: nn.Module, blocks: nn.ModuleList, prefix: str, batches: list[Tensor], check: QuickCheck | None,
             head_bits: int, streamed: StreamedModel | None):
    """What each block is called with for each token batch (the calibration's, then the check's), and
    the check's block-0 inputs as the quantized model's embeddings will give them (rows rounded to
    bf16 when they will be stored so). A streamed model reads its embeddings (not its head) and block 0
    (which tells what blocks return) for this, then releases them."""
    if streamed is not None:
        streamed.materialize(f"{prefix}.0")
        streamed.materialize("", outside=(prefix,) + tuple(name for name in streamed.ends()[1:] if name))
    checked = check.batches if check is not None else []
    calls = capture_block_calls(model, blocks, batches + checked)
    quantized = calls.inputs[len(batches):]
    rounding = stored_embedding_dtype(model, head_bits) if check is not None else None
    if rounding is not None:
        embedding = model.get_input_embeddings()
        weight = embedding.weight
        embedding.weight = nn.Parameter(weight.to(rounding).to(weight.dtype), requires_grad=False)
        try:
            quantized = capture_block_calls(model, blocks, checked).inputs
        finally:
            embedding.weight = weight
    if streamed is not None:
        streamed.release_outside(prefix)
        streamed.release(f"{prefix}.0")
    return calls, quantized


def _outside_blocks(model: nn.Module, blocks: nn.ModuleList, prefix: str, config: QuantConfig, device: torch.device,
                    batches: list[Tensor], final_outputs: list[Tensor] | None, returns_tuple: bool,
                    streamed: StreamedModel | None, check: QuickCheck | None,
                    cache: HessianCache | None) -> LayerRecord | None:
    """The head and embeddings once the blocks are done (returns the head's record), with the quick
    check's float side before the head changes and its quantized side after. A streamed model reads the head (and final norm) first
    and the embeddings once the head is done, so the two are never both in float32 in memory."""
    load_embeddings = None
    if streamed is not None:
        embeddings, untied_head = streamed.ends()
        streamed.materialize("", outside=(prefix, embeddings) if untied_head else (prefix,))
        load_embeddings = lambda: streamed.materialize("", outside=(prefix,))  # noqa: E731
    if check is not None:
        check.finish_float(model, blocks, returns_tuple)
    head = compress_head(model, config, device, batches, blocks, final_outputs, returns_tuple, load_embeddings, cache)
    if streamed is not None:
        streamed.materialize("", outside=(prefix,))  # whatever the head's stage left on disk (a float32 head)
    if check is not None:
        check.finish_quantized(model, blocks, returns_tuple)
    return head


def _guided_weights(model: nn.Module, blocks: nn.ModuleList, prefix: str, tokens: Tensor,
                    calibration: CalibrationConfig, device: torch.device, streamed: StreamedModel | None,
                    ranks: Ranks, reporter: Reporter) -> dict[str, Tensor]:
    """The guided Hessians' token weights of every linear in the blocks (pipeline/guided.py), from the
    whole float model: before any block is quantized."""
    if streamed is not None or ranks.active:
        raise QuipkitError("guided Hessians need the whole float model in one process (a backward pass through "
                           "it); drop --nproc, or quantize a model that is loaded whole (a GGUF file)")
    linears = {}
    for index, block in enumerate(blocks):
        linears.update(select_linears(block, f"{prefix}.{index}", (), ()))
    experts = [name for name in linears if is_expert(name)]
    if experts:  # an expert reads only the tokens routed to it: per-token weights do not line up with them
        raise QuipkitError(f"guided Hessians do not cover mixture-of-experts layers yet ({experts[0]} and "
                           f"{len(experts) - 1} more); use --hessian input")
    model.to(device)
    try:
        return output_gradient_weights(model, linears, tokens, calibration.guided_groups, reporter)
    finally:
        model.to("cpu")


def _let_go(batches: Batches, ranks: Ranks) -> None:
    """Delete offloaded batches no pass will read again (the leader, once every process is past them)."""
    if isinstance(batches, OffloadedBatches) and ranks.leader:
        batches.delete()


def _restore_blocks(model: nn.Module, state: RunState, count: int) -> None:
    """Put the first `count` finished blocks of `state` into `model`: their quantized layers and the rest of
    their tensors."""
    for index in range(count):
        specs, tensors = state.load_block(index)
        for name, spec in specs.items():
            bias = model.get_submodule(name).bias
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            try:
                layer = QuantizedLinear.from_tensors(spec, own, bias)
            except (ValueError, KeyError, TypeError, QuipkitError) as err:  # the work folder was tampered with
                raise QuipkitError(f"{state.block_file(index)} does not fit layer {name} ({err}); "
                                   f"delete {state.folder} to start over") from None
            set_module(model, name, layer)
        held = dict(model.named_parameters()) | dict(model.named_buffers())
        for key, value in tensors.items():  # the block's other tensors: norms that block fine-tuning trained
            if not any(key.startswith(name + ".") for name in specs) and key in held:
                held[key].data.copy_(value)


def _quantize_block(
    block: nn.Module,
    linears: dict[str, nn.Linear],
    inputs: Batches,
    kwargs: list[dict],
    config: QuantConfig,
    device: torch.device,
    reporter: Reporter,
    report: QuantizeReport,
    cached: HessianGroups | None = None,
    observed: dict[str, nn.Linear] | None = None,
    ranks: Ranks | None = None,
    keep_hessians: bool = False,
    space: ActivationFolder | None = None,
    finetune: FinetuneOptions | None = None,
    guide: dict[str, Tensor] | None = None,
) -> tuple[Batches, dict, list[LayerRecord], HessianGroups | None, dict[str, Any] | None]:
    """Quantize `linears` of one block: (next inputs, saved layers, records, the Hessians it collected
    when `keep_hessians`, else None: each is let go, or overwritten, as soon as it is used; and with
    `finetune`, the block fine-tuning's record).

    Without calibration (round-to-nearest) each linear uses H = I; with `cached` Hessians the
    block is not run at all. Hessians are collected for `observed` (default: `linears`), a superset.
    Unless they are all kept (for a cache), the pass that gives the block's outputs sums only the first
    group's; each other group's is summed when its turn comes, so one large Hessian is held at a time.

    With `config.sequential` (GPTQ's true-sequential), each group after the first gets its Hessian
    from the block with the earlier groups already quantized, so it learns to absorb their error.
    """
    t0 = time.perf_counter()
    ranks = ranks or Ranks()
    notes: dict[str, str] = {}
    if cached is not None:  # the float block's outputs only when fine-tuning needs them as targets
        outputs = _shared_run(block, inputs, kwargs, device, ranks, space=space) if finetune is not None else inputs
        groups = cached
    elif config.needs_calibration:
        later = not keep_hessians  # groups after the first collect their own when their turn comes
        outputs, groups, notes = collect_hessians(block, observed or linears, inputs, kwargs, device, ranks, later,
                                                  space, guide)
    else:
        outputs = inputs
        groups = [([name], None) for name in linears]  # uncalibrated: H = I, built only if a transform needs it
    t1 = time.perf_counter()
    report.seconds["hessian"] += t1 - t0
    saved: dict[str, tuple[dict, dict[str, Tensor]]] = {}
    records: list[LayerRecord] = []
    with reporter.task("  layers", len(linears)) as layer_task:
        selected = [(names, hessian) for names, hessian in groups if any(n in linears for n in names)]
        missing = set(linears) - {name for names, _ in selected for name in names}
        if missing and cached is not None:  # a cache written before caches held every linear
            raise QuipkitError(f"the Hessian cache has no Hessian for {sorted(missing)[0]}; delete the cache folder "
                               "(--hessian-cache) and run again")
        if missing:  # never skip a layer silently
            raise QuipkitError(f"no calibration token reached {sorted(missing)[0]}: the block's forward never calls "
                               "it; leave it out with --exclude")
        if not keep_hessians:
            groups = None  # `selected` holds the Hessians now, and lets each go once used
        def install(results: list[tuple[QuantizedLinear, LayerRecord]]) -> None:
            for layer, record in results:
                if record.name in notes:
                    record = replace(record, warnings=(notes[record.name],) + record.warnings)
                local = _relative(block, record.name, linears)
                set_module(block, local, layer.to(device))
                del linears[record.name]  # its float weight goes once nothing else holds it
                saved[record.name] = (layer.spec(), {k: v.cpu() for k, v in layer.state_dict().items()})
                records.append(record)
                layer_task.advance(1, status=f"{local} proxy {record.proxy:.4f}")

        def members_of(group: list[str]) -> dict[str, nn.Linear]:
            return {name: linears[name] for name in group if name in linears}

        def hessian_now(members: dict[str, nn.Linear]) -> Tensor:
            """The Hessian of the members' input in the block as it is now (its time is not rounding's)."""
            nonlocal t1
            start = time.perf_counter()
            first = next(iter(members))
            hessian = _hessian_at(block, first, members[first], inputs, kwargs, device, ranks, guide)
            report.seconds["hessian"] += time.perf_counter() - start
            t1 += time.perf_counter() - start
            return hessian

        if config.sequential and config.needs_calibration:  # each group sees the earlier ones quantized
            # the groups after the first get a Hessian of the block as it will be then (a cached one is
            # dropped); so does a first selected group that the first pass did not sum (include/exclude)
            selected = [(group, h if index == 0 or is_expert(group[0]) else None)
                        for index, (group, h) in enumerate(selected)]
            for index, (group, _) in enumerate(selected):
                members = members_of(group)
                hessian, fresh = selected[index][1], not keep_hessians
                selected[index] = (group, None)  # each Hessian is let go once used (a 7B MLP's is 1 GB)
                if hessian is None and not is_expert(group[0]):
                    hessian, fresh = hessian_now(members), True
                install(quantize_group(members, hessian, config, device, consume=fresh))
                del hessian
        else:  # independent groups: divided among the processes, then exchanged
            costs = [sum(m.in_features * m.out_features for m in members_of(group).values()) for group, _ in selected]
            owners = ranks.owners(costs)
            mine = {}
            # the largest Hessian first: the others wait in memory while a group is rounded
            widest = sorted(range(len(selected)), key=lambda i: -next(iter(members_of(selected[i][0]).values())).in_features)
            for index in widest:
                group, hessian = selected[index]
                selected[index] = (group, None)
                if hessian is None and config.needs_calibration:  # the block is still float (layers go in
                    # after the exchange), so this is the H the first pass would have summed
                    hessian = hessian_now(members_of(group))
                if owners[index] == ranks.rank:
                    mine[index] = quantize_group(members_of(group), hessian, config, device, consume=not keep_hessians)
                del hessian
            for index, results in sorted(_exchange(mine, ranks, linears).items()):
                install(results)
    t2 = time.perf_counter()
    report.seconds["rounding"] += t2 - t1
    tuned = None
    if finetune is not None:
        tuned = finetune_block(block, inputs, outputs, kwargs, finetune, device)
        report.seconds["finetune"] = report.seconds.get("finetune", 0.0) + time.perf_counter() - t2
        t2 = time.perf_counter()
    if config.needs_calibration and config.propagate == "quantized":
        if outputs is not inputs:
            _let_go(outputs, ranks)  # the float block's outputs: the quantized block's replace them
        outputs = _shared_run(block, inputs, kwargs, device, ranks, space=space)
        report.seconds["propagate"] += time.perf_counter() - t2
    return outputs, saved, records, groups, tuned


def _exchange(mine: dict[int, list[tuple[QuantizedLinear, LayerRecord]]], ranks: Ranks,
              linears: dict[str, nn.Linear]) -> dict[int, list[tuple[QuantizedLinear, LayerRecord]]]:
    """Every process's quantized groups {group index: [(layer, record)]}, on every process."""
    if not ranks.active:
        return mine
    portable = {index: [(layer.spec(), layer.stored_tensors(), record) for layer, record in results]
                for index, results in mine.items()}
    merged: dict[int, list[tuple[QuantizedLinear, LayerRecord]]] = {}
    for part in ranks.gather([portable]):
        for index, results in part.items():
            merged[index] = [(QuantizedLinear.from_tensors(spec, tensors, linears[record.name].bias), record)
                             for spec, tensors, record in results]
    return merged


def _relative(block: nn.Module, full_name: str, linears: dict[str, nn.Linear]) -> str:
    """The name of linear `full_name` inside `block`."""
    target = linears[full_name]
    for name, module in block.named_modules():
        if module is target:
            return name
    raise KeyError(full_name)
