"""Mixture-of-experts experts as one linear layer per expert, so every expert matrix is quantized.

transformers stores a block's experts as fused 3-D parameters (`gate_up_proj` [E, 2I, H] or, transposed,
[E, H, 2I]; `down_proj` [E, H, I]) that no `nn.Linear` search finds. `unfuse_experts` replaces each
such module by `ExpertLinears`: the same computation, with `gate_up.e` and `down.e` as ordinary linears
(biases included). The rest of quipkit then treats them like any linear: each expert's Hessian comes
from the tokens routed to it, its matrices are quantized and stored under their own names, and a
checkpoint records which modules were unfused so loading rebuilds the same layout first.

Experts are found by structure (a module with 3-D `down_proj` and `gate_up_proj` or `up_proj`
parameters whose first dimension is the number of experts), never by architecture name; the
layout flags (`is_transposed`, `has_gate`, `has_bias`, ...) are the ones transformers' experts carry.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from quipkit.models.structure import set_module


def _fused(module: nn.Module) -> str | None:
    """'gate_up_proj' or 'up_proj' when `module` holds fused experts, else None."""
    params = dict(module.named_parameters(recurse=False))
    down = params.get("down_proj")
    first = params.get("gate_up_proj", params.get("up_proj"))
    if down is None or first is None or down.dim() != 3 or first.dim() != 3 or down.shape[0] != first.shape[0]:
        return None
    return "gate_up_proj" if "gate_up_proj" in params else "up_proj"


def find_fused_experts(root: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the fused experts modules under `root`."""
    return {name: module for name, module in root.named_modules() if _fused(module) is not None}


class ExpertLinears(nn.Module):
    """A fused experts module's computation with one `nn.Linear` (or quantized layer) per expert matrix.

    The original module is kept, emptied of its matrices, for its gating function (`_apply_gate`, which
    may clamp or interleave) and activation; its optional post-expert norm becomes `post_norm`.
    """

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        first = _fused(fused)
        self.transposed = bool(getattr(fused, "is_transposed", False))
        self.gated = first == "gate_up_proj"
        w1, w2 = getattr(fused, first), fused.down_proj  # [E, out, in], or [E, in, out] when transposed
        b1, b2 = getattr(fused, f"{first}_bias", None), getattr(fused, "down_proj_bias", None)
        self.num_experts = w1.shape[0]
        self.gate_up = nn.ModuleList(self._linears(w1, b1))
        self.down = nn.ModuleList(self._linears(w2, b2))
        for name in (first, "down_proj", f"{first}_bias", "down_proj_bias"):
            if name in fused._parameters:
                del fused._parameters[name]
        # Kept for its gating function and activation only, and not as a submodule: transformers would
        # re-initialise it as the experts class (whose matrices are gone) when loading a checkpoint.
        object.__setattr__(self, "fused", fused)
        self.post_norm = fused.post_expert_norm if getattr(fused, "has_post_expert_norm", False) else None

    def _linears(self, weight: Tensor, bias: Tensor | None) -> list[nn.Linear]:
        """One linear per expert from a fused [E, out, in] (or transposed [E, in, out]) weight."""
        layers = []
        for e in range(weight.shape[0]):
            matrix = weight[e].t() if self.transposed else weight[e]  # [out, in]
            # no random initialisation: the weights are copied in (or, on meta, loaded later)
            layer = skip_init(nn.Linear, matrix.shape[1], matrix.shape[0], bias=bias is not None,
                              device=matrix.device, dtype=matrix.dtype)
            with torch.no_grad():
                if matrix.device.type != "meta":
                    layer.weight.copy_(matrix)
                    if bias is not None:
                        layer.bias.copy_(bias[e])
            layers.append(layer)
        return layers

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        """hidden_states [T, H], top_k_index [T, k] (expert ids), top_k_weights [T, k] -> [T, H]."""
        tokens, k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        rows = torch.arange(tokens, device=hidden_states.device).repeat_interleave(k)
        weights = top_k_weights.reshape(-1)
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=self.num_experts + 1)[: self.num_experts].tolist()
        out = torch.zeros_like(hidden_states)
        start = 0
        for e, count in enumerate(counts):  # one call per expert hit, over all of its tokens
            if count == 0:
                continue
            pick = order[start:start + count]
            start += count
            idx = rows[pick]
            h = self.gate_up[e](hidden_states[idx])
            h = self.fused._apply_gate(h) if self.gated else self.fused.act_fn(h)
            y = self.down[e](h)
            if self.post_norm is not None:
                y = self.post_norm(y)
            out.index_add_(0, idx, (y * weights[pick, None]).to(out.dtype))
        return out


def unfuse_experts(root: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace the fused experts modules under `root` (those named in `names`, or all found) by
    `ExpertLinears`; returns their names."""
    found = find_fused_experts(root)
    chosen = list(found) if names is None else names
    for name in chosen:
        if name in found:
            set_module(root, name, ExpertLinears(found[name]))
    return chosen
