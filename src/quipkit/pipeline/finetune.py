"""Fine-tuning of a quantized model's continuous parameters: end to end (QuIP#'s second stage) and
block by block while quantizing (its first).

The main codes stay fixed. Every quantized layer with the random Hadamard transform trains its two
diagonals (`su`, `sv`: the sign vectors relaxed to real scales, `sv` carrying the layer's scale) on
its weight decoded once for the whole run, and a CALDERA layer its low-rank factors on their grid
(factors in a trellis code stay as rounded);
norms and biases train too; embeddings and the head stay frozen. The loss is the KL divergence from
the float model's next-token distribution, kept per position as its top-K log-probabilities plus the
log of the rest's mass (a few MB where whole distributions would be GBs). A held-out slice of the
calibration sequences stops training early and picks the best state. With a work folder, the state
is saved at every evaluation and an interrupted run resumes from there, to the same result. A block,
right after its layers are rounded, trains the same parameters (its own) to reproduce the float
block's outputs on the calibration activations.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from quipkit.console import Reporter
from quipkit.errors import QuipkitError
from quipkit.formats.atomic import atomic_save_tensors
from quipkit.kernels.ops import hadamard
from quipkit.layers.quantized_linear import QuantizedLinear
from quipkit.models.structure import set_module


@dataclass(frozen=True)
class FinetuneOptions:
    """lr is relative: each tensor's Adam step size is lr times the tensor's RMS at the start."""

    lr: float = 2e-3
    epochs: int = 3
    holdout: float = 0.1  # share of the calibration sequences kept out of training, for early stopping
    evals_per_epoch: int = 2
    patience: int = 2  # evaluations without improvement before stopping
    top_k: int = 128
    batch: int = 1
    seed: int = 0
    factors: bool = True  # train CALDERA's low-rank factors too (rounded to their grid in every forward)

    def __post_init__(self) -> None:
        if not (self.lr > 0 and self.epochs >= 1 and 0 < self.holdout < 1 and self.evals_per_epoch >= 1
                and self.patience >= 1 and self.top_k >= 1 and self.batch >= 1):
            raise QuipkitError(f"bad fine-tuning options {asdict(self)}: lr > 0, epochs >= 1, 0 < holdout < 1, "
                               "evals_per_epoch, patience, top_k and batch >= 1")


@dataclass
class TeacherTargets:
    """The float model's next-token distributions on [N, T] token windows, cut to their top K."""

    indices: Tensor  # [N, T, K] int64: the K most likely next tokens
    logp: Tensor  # [N, T, K] float32: their log-probabilities
    log_rest: Tensor  # [N, T] float32: log of the probability of every other token

    def rows(self, rows: Tensor | slice, device) -> tuple[Tensor, Tensor, Tensor]:
        """(indices, logp, log_rest) of sequences `rows`, on `device`: topk_kl's last three arguments."""
        return tuple(t[rows].to(device) for t in (self.indices, self.logp, self.log_rest))


@torch.no_grad()
def teacher_targets(model: nn.Module, tokens: Tensor, top_k: int, reporter: Reporter | None = None) -> TeacherTargets:
    """The top-`top_k` targets of `model` (the float model) on `tokens` [N, T], one window at a time."""
    reporter = reporter or Reporter()
    parts: list[tuple[Tensor, Tensor, Tensor]] = []
    device = next(model.parameters()).device
    with reporter.task("teacher (float model)", len(tokens)) as task:
        for window in tokens:
            logq = model(input_ids=window[None].to(device), use_cache=False).logits[0].float().log_softmax(-1)
            logp, indices = logq.topk(top_k, dim=-1)
            parts.append((indices.cpu(), logp.cpu(), _log_rest(logp).cpu()))
            task.advance()
    return TeacherTargets(*(torch.stack(p) for p in zip(*parts)))


def _log_rest(logp: Tensor) -> Tensor:
    """log(1 - sum(exp(logp))) over the last dim of `logp` [..., K], floored at 1e-12."""
    return torch.log((1 - logp.exp().sum(-1)).clamp_min(1e-12))


def topk_kl(logits: Tensor, indices: Tensor, logp: Tensor, log_rest: Tensor) -> Tensor:
    """Mean KL(teacher || student) per position, with the student's `logits` [..., V] coarsened to the
    teacher's top K (`indices`, `logp` [..., K]) plus one bucket for the rest (`log_rest` [...])."""
    logq = logits.float().log_softmax(-1).gather(-1, indices)
    kl = (logp.exp() * (logp - logq)).sum(-1) + log_rest.exp() * (log_rest - _log_rest(logq))
    return kl.mean()


class DecodedLinear(nn.Module):
    """A quantized layer while it trains: y = sv ⊙ (A (su ⊙ x)) + b with A = Had_m W~ Had_n^T [out, in],
    its codes decoded and both Hadamard transforms applied once (frozen, so a step costs what a float
    layer's does), and su [in], sv [out] (and the bias) trainable in float32.

    With `factors`, a CALDERA layer's W~ = Q + L R keeps only Q frozen: L [out, k] and R [k, in] train
    like a LoRA adapter, each rounded to its stored grid (the scales it was stored with) in every
    forward with straight-through gradients, so what trains is what `write_back` stores. Factors in a
    trellis code (`row_scaled`) stay as rounded, folded into the frozen weight: rounding them again
    would be a Viterbi search per step, and training rank 64's grid factors on the reference model
    changed nothing (38.37 wt2 after `e2e` with them trained or frozen)."""

    def __init__(self, layer: QuantizedLinear, factors: bool = False) -> None:
        super().__init__()
        self.factor_codebook = None
        if factors and layer.low_rank is not None and not layer.low_rank.row_scaled:
            (left, self.left_params), (right, self.right_params) = layer.low_rank.unpacked(
                layer.stored_tensors(), layer.out_features, layer.in_features)
            self.factor_codebook = layer.low_rank.codebook
            self.left = nn.Parameter(self.factor_codebook.decode(left, self.left_params))  # [out, k]
            self.right = nn.Parameter(self.factor_codebook.decode(right, self.right_params))  # [k, in]
            weight = layer.codebook.dequantize(layer.codebook_tensors(), layer.out_features, layer.in_features)
        else:
            layer.keep_decoded(True)
            weight = layer.decoded
            layer.keep_decoded(False)
        self.register_buffer("weight", _both_sides_rotated(weight))
        self.su = nn.Parameter(layer.su.float().clone())
        self.sv = nn.Parameter(layer.sv.float().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def _on_grid(self, factor: Tensor, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(codes, values) of `factor` [r, c] rounded to its stored grid `params`."""
        columns = torch.arange(factor.shape[1], device=factor.device)
        return self.factor_codebook.quantize(factor.detach(), params, columns)

    def _rounded(self, factor: Tensor, params: dict[str, Tensor]) -> Tensor:
        """`factor` [r, c] on its grid; the gradient passes straight through the rounding."""
        return factor + (self._on_grid(factor, params)[1] - factor).detach()

    def forward(self, x: Tensor) -> Tensor:
        x = x * self.su.to(x.dtype)
        y = x @ self.weight.to(x.dtype).t()
        if self.factor_codebook is not None:  # (x R'^T) L'^T with L' = Had_m L, R' = R Had_n^T
            right = hadamard(self._rounded(self.right, self.right_params), None, None, transpose=False)
            left = hadamard(self._rounded(self.left, self.left_params).t().contiguous(), None, None, transpose=False)
            y = y + (x @ right.to(x.dtype).t()) @ left.to(x.dtype)
        y = y * self.sv.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def write_back(self, layer: QuantizedLinear) -> None:
        """Store the trained vectors in `layer` (fp16, as the checkpoint holds them), and the trained
        factors' codes beside their unchanged scales."""
        layer.su = self.su.detach().half().contiguous()
        layer.sv = self.sv.detach().half().contiguous()
        if self.factor_codebook is not None:
            stored = layer.low_rank.pack((self._on_grid(self.left, self.left_params)[0], self.left_params),
                                         (self._on_grid(self.right, self.right_params)[0], self.right_params))
            for name, tensor in stored.items():
                setattr(layer, name, tensor.to(getattr(layer, name).device))
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())


def _both_sides_rotated(weight: Tensor) -> Tensor:
    """Had_m W Had_n^T for W [m, n]: the Hadamard transform of every row, then of every column."""
    rows_rotated = hadamard(weight, None, None, transpose=False)
    return hadamard(rows_rotated.t().contiguous(), None, None, transpose=False).t().contiguous()


class DecodedBlockScales(nn.Module):
    """A layer in one of llama.cpp's 32-block formats while it trains: W = level[code] * scale (+ minimum)
    per block of 32 weights, the levels [out, blocks, 32] frozen and each block's fp16 scale (and
    minimum) trainable in float32, as QuIP# trains its codebook scales."""

    def __init__(self, layer: QuantizedLinear) -> None:
        super().__init__()
        codebook = layer.codebook
        rows, cols = layer.out_features, layer.in_features
        codes, params = codebook.unpack(layer.codebook_tensors(), rows, cols)
        self.register_buffer("levels", codebook.levels(codes).reshape(rows, -1, codebook.format.block))
        self.scale = nn.Parameter(params["scale"].float().clone())
        self.min = nn.Parameter(params["min"].float().clone()) if "min" in params else None
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        weight = self.levels * self.scale.unsqueeze(-1)
        if self.min is not None:
            weight = weight + self.min.unsqueeze(-1)
        y = x @ weight.flatten(1).to(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(y.dtype)

    @torch.no_grad()
    def write_back(self, layer: QuantizedLinear) -> None:
        """Store the trained scales in `layer`'s blocks (fp16, as llama.cpp reads them), beside its codes."""
        params = {"scale": self.scale.detach().half().float(), **({"min": self.min.detach().half().float()}
                                                                   if self.min is not None else {})}
        codes, _ = layer.codebook.unpack(layer.codebook_tensors(), layer.out_features, layer.in_features)
        for name, tensor in layer.codebook.pack(codes, params).items():
            setattr(layer, name, tensor.to(getattr(layer, name).device))
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())


def _training_form(module: nn.Module, factors: bool) -> nn.Module | None:
    """The trainable stand-in of a quantized layer (DecodedLinear, its low-rank factors trained with
    `factors`; DecodedBlockScales), or None."""
    from quipkit.codebooks.ggml_blocks import GgmlBlocks

    if not isinstance(module, QuantizedLinear):
        return None
    if module.transform.name == "rht":
        return DecodedLinear(module, factors)
    if type(module.codebook) is GgmlBlocks and module.low_rank is None:  # not the k-quants' tied scales
        return DecodedBlockScales(module)
    return None


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, nn.LayerNorm) or name.endswith("rmsnorm") or name.endswith("layernorm")


class _Trainable:
    """The model prepared for training: quantized RHT layers swapped for DecodedLinear (llama.cpp block
    formats for DecodedBlockScales; CALDERA's factors train with `factors`), every parameter frozen but
    theirs and the norms'. `restore()` writes the trained values back, puts the layers back and gives
    every parameter its former requires_grad."""

    def __init__(self, model: nn.Module, factors: bool) -> None:
        self.model = model
        self.swapped: dict[str, tuple[QuantizedLinear, DecodedLinear | DecodedBlockScales]] = {}
        self.wanted_grad = {p: p.requires_grad for p in model.parameters()}  # given back by restore()
        for p in model.parameters():
            p.requires_grad_(False)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        for name, module in list(model.named_modules()):
            decoded = _training_form(module, factors) if module is not head else None
            if decoded is not None:
                set_module(model, name, decoded)
                self.swapped[name] = (module, decoded)
        self.norms = {name: m for name, m in model.named_modules() if _is_norm(m)}
        self.params: dict[str, nn.Parameter] = {}
        for prefix, module in [*((n, d) for n, (_, d) in self.swapped.items()), *self.norms.items()]:
            for pname, p in module.named_parameters(recurse=False):
                p.requires_grad_(True)
                self.params[f"{prefix}.{pname}"] = p
        if not self.params:
            raise QuipkitError("the model has nothing to fine-tune: no quantized layer with the Hadamard transform "
                               "or in a llama.cpp block format, and no norm")

    def restore(self) -> None:
        for name, (layer, decoded) in self.swapped.items():
            decoded.write_back(layer)
            set_module(self.model, name, layer)
        for p, wanted in self.wanted_grad.items():
            p.requires_grad_(wanted)


def _adam(params: dict[str, nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with each tensor's step size `lr` times its RMS now: relative steps for vectors of any scale."""
    return torch.optim.Adam([{"params": [p], "lr": lr * max(float(p.detach().float().pow(2).mean().sqrt()), 1e-4)}
                             for p in params.values()])


def finetune_block(block: nn.Module, inputs, targets, kwargs: list[dict], options: FinetuneOptions,
                   device: torch.device) -> dict[str, Any]:
    """Train a quantized block's continuous parameters in place so it maps the calibration batches
    `inputs` to `targets` (the float block's outputs on them; both [b, T, d] per batch, in memory or
    offloaded) under the relative MSE sum((out - y)^2) / sum(y^2); the last tenth of the batches (at
    least one) is held out to stop early and pick the best state. Returns the held-out loss before and
    after, and the steps taken."""
    from quipkit.pipeline.capture import block_output, compute_dtype, move

    count = len(inputs)
    if count < 2:
        raise QuipkitError(f"block fine-tuning needs at least 2 calibration batches (one held out), got {count}; "
                           "raise --nsamples or lower --calib-batch")
    held = list(range(count - max(1, round(count * options.holdout)), count))
    train = list(range(held[0]))
    compute = compute_dtype(block)

    def loss_of(i: int) -> Tensor:
        out = block_output(block(inputs[i].to(device, compute), **move(kwargs[i], device)))
        target = targets[i].to(device, out.dtype)
        return (out - target).pow(2).sum() / target.pow(2).sum()

    def held_out() -> float:
        with torch.no_grad():
            return sum(float(loss_of(i)) for i in held) / len(held)

    start = time.perf_counter()
    trainable = _Trainable(block, options.factors)
    try:
        with torch.enable_grad():
            params = trainable.params
            optimizer = _adam(params, options.lr)
            before = best = held_out()
            best_params = {n: p.detach().clone() for n, p in params.items()}
            stale = steps = 0
            for epoch in range(options.epochs):
                for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(options.seed + epoch)).tolist():
                    loss = loss_of(train[i])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    steps += 1
                value = held_out()
                if value < best:
                    best, stale = value, 0
                    best_params = {n: p.detach().clone() for n, p in params.items()}
                else:
                    stale += 1
                    if stale >= options.patience:
                        break
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(best_params[name])
    finally:
        trainable.restore()
    return {"held_out_mse_before": before, "held_out_mse_after": best, "steps": steps,
            "seconds": time.perf_counter() - start}


def block_record(blocks: list[dict[str, Any]]) -> dict[str, Any]:
    """The block stage's record for a run's report: means over the blocks, and each block's own."""
    return {"stage": "block", "held_out_mse_before": sum(b["held_out_mse_before"] for b in blocks) / len(blocks),
            "held_out_mse_after": sum(b["held_out_mse_after"] for b in blocks) / len(blocks),
            "steps": sum(b["steps"] for b in blocks), "seconds": sum(b["seconds"] for b in blocks), "blocks": blocks}


def _held_out_kl(model: nn.Module, tokens: Tensor, targets: TeacherTargets, rows: Tensor, device) -> float:
    with torch.no_grad():
        total = 0.0
        for i in rows.tolist():
            logits = model(input_ids=tokens[i:i + 1].to(device), use_cache=False).logits
            total += float(topk_kl(logits, *targets.rows(slice(i, i + 1), device)))
        return total / len(rows)


STATE_FILE = "finetune_e2e.safetensors"


def finetune_against_source(model: nn.Module, source, tokens: Tensor, options: FinetuneOptions,
                            reporter: Reporter | None = None, work: Path | None = None) -> dict[str, Any]:
    """`finetune_e2e` with the teacher's targets from the float model at `source` (a ModelSource), loaded
    whole for one pass over `tokens` [N, T] and released before training."""
    from quipkit.models.loading import load_float_model

    reporter = reporter or Reporter()
    reporter.log(f"fine-tuning e2e: the float model's targets on {len(tokens)} calibration sequences")
    teacher, _ = load_float_model(source)
    targets = teacher_targets(teacher.to(next(model.parameters()).device), tokens, options.top_k, reporter)
    del teacher
    return finetune_e2e(model, tokens, targets, options, reporter, work)


def finetune_e2e(model: nn.Module, tokens: Tensor, targets: TeacherTargets, options: FinetuneOptions = FinetuneOptions(),
                 reporter: Reporter | None = None, work: Path | None = None) -> dict[str, Any]:
    """Train `model`'s continuous parameters in place to match `targets` on `tokens` [N, T]; returns the
    run's record (held-out KL before and after, per-evaluation history, steps, seconds)."""
    reporter = reporter or Reporter()
    count = len(tokens)
    if count < 2:
        raise QuipkitError(f"fine-tuning needs at least 2 calibration sequences (one held out), got {count}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(options.seed)
    order = torch.randperm(count, generator=gen)
    held = order[: max(1, round(count * options.holdout))]
    train = order[len(held):]
    device = next(model.parameters()).device
    trainable = _Trainable(model, options.factors)
    try:
        params = trainable.params
        optimizer = _adam(params, options.lr)
        model.train(False)  # no dropout: the quantized model should match the float one as used
        steps_per_epoch = math.ceil(len(train) / options.batch)
        eval_every = math.ceil(steps_per_epoch / options.evals_per_epoch)
        total_steps = steps_per_epoch * options.epochs
        identity = _identity(options, tokens, params)
        state = _load_state(work, params, optimizer, identity)
        if state is None:
            before = _held_out_kl(model, tokens, targets, held, device)
            state = {"step": 0, "before": before, "best": before, "best_step": 0, "stale": 0,
                     "history": [[0, before]], "best_params": {n: p.detach().clone() for n, p in params.items()}}
            reporter.log(f"fine-tuning e2e: {len(params)} tensors, held-out KL {before:.4f} before")
        best_params = state.pop("best_params")
        with reporter.task("fine-tune e2e", total_steps) as task:
            task.advance(state["step"])
            while state["step"] < total_steps and state["stale"] < options.patience:
                epoch, at = divmod(state["step"], steps_per_epoch)
                perm = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(options.seed + 1 + epoch))]
                rows = perm[at * options.batch:(at + 1) * options.batch]
                logits = model(input_ids=tokens[rows].to(device), use_cache=False).logits
                loss = topk_kl(logits, *targets.rows(rows, device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["step"] += 1
                task.advance(1, status=f"KL {float(loss.detach()):.4f}")
                if state["step"] % eval_every == 0 or state["step"] == total_steps:
                    kl = _held_out_kl(model, tokens, targets, held, device)
                    state["history"].append([state["step"], kl])
                    if kl < state["best"]:
                        state.update(best=kl, best_step=state["step"], stale=0)
                        best_params = {n: p.detach().clone() for n, p in params.items()}
                    else:
                        state["stale"] += 1
                    reporter.log(f"fine-tuning e2e: step {state['step']}, held-out KL {kl:.4f} (best {state['best']:.4f})")
                    _save_state(work, params, optimizer, identity, state, best_params)
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(best_params[name])
    finally:
        trainable.restore()
    return {"stage": "e2e", "options": asdict(options), "held_out_kl_before": state["before"],
            "held_out_kl_after": state["best"], "steps": state["step"], "best_step": state["best_step"],
            "history": state["history"], "trained_layers": len(trainable.swapped), "trained_norms": len(trainable.norms),
            "train_sequences": len(train), "held_out_sequences": len(held), "seconds": time.perf_counter() - start}


def _identity(options: FinetuneOptions, tokens: Tensor, params: dict[str, Tensor]) -> str:
    """What a saved state must match to be resumed: the options, the calibration tokens and the trained
    tensors' values before training (so another model, or other codes, never resume it)."""
    digest = hashlib.sha256(json.dumps(asdict(options)).encode())
    digest.update(tokens.cpu().contiguous().numpy().tobytes())
    for name, p in params.items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _save_state(work: Path | None, params: dict[str, Tensor], optimizer: torch.optim.Adam, identity: str,
                state: dict[str, Any], best: dict[str, Tensor]) -> None:
    """Everything a resumed run needs, in one file written atomically."""
    if work is None:
        return
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    tensors.update({f"best/{n}": t for n, t in best.items()})
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{key}/{name}"] = value.detach().reshape(-1) if key == "step" else value.detach()
    meta = {"state": json.dumps(state), "identity": identity}
    work.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(work / STATE_FILE, tensors, meta)


def _load_state(work: Path | None, params: dict[str, nn.Parameter], optimizer: torch.optim.Adam,
                identity: str) -> dict[str, Any] | None:
    """The saved state of an interrupted run of the same `identity`, loaded into `params` and
    `optimizer`; None when there is none."""
    path = None if work is None else work / STATE_FILE
    if path is None or not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata()
    if meta.get("identity") != identity:
        path.unlink()  # another run's state: start afresh
        return None
    tensors = load_file(str(path))
    state = json.loads(meta["state"])
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"])
            if f"adam.step/{name}" in tensors:
                optimizer.state[p] = {"step": tensors[f"adam.step/{name}"].reshape(()),
                                      "exp_avg": tensors[f"adam.exp_avg/{name}"].clone(),
                                      "exp_avg_sq": tensors[f"adam.exp_avg_sq/{name}"].clone()}
    state["best_params"] = {n: tensors[f"best/{n}"].clone() for n in params}
    return state
