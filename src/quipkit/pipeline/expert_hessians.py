"""Hessians for experts that calibration barely reached.

An expert's Hessian comes from the tokens routed to it. A rare expert may see fewer tokens than it
has inputs (a rank-deficient H that would let rounding put any error where no token looked) or none
at all. Such an expert's H is blended toward the token-weighted average Hessian of the same matrix
in the block's other experts: H = (n H_e + (d - n) H_avg) / d for n < d tokens and d inputs (all
average for n = 0; the identity when no expert of the block saw a token). The blend is recorded on
the layer, never silent.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_EXPERT = re.compile(r"^(?P<family>.+\.(?:gate_up|down))\.(?P<index>\d+)$")


def is_expert(name: str) -> bool:
    """Whether `name` is one expert's matrix of an unfused experts module (`...experts.gate_up.3`)."""
    return _EXPERT.match(name) is not None


def complete_expert_hessians(
    groups: list[tuple[list[str], Tensor]], tokens: dict[str, int], inputs: dict[str, int]
) -> tuple[list[tuple[list[str], Tensor]], dict[str, str]]:
    """(groups with every expert linear of `inputs` {name: in_features} present, {name: note} for the
    blended ones).

    `groups` are (names reading one input, H [d, d]); `tokens` the number of tokens behind each group's
    H, keyed by its first name. Linears that are not experts are left as they are."""
    by_name = {group[0]: (group, hessian) for group, hessian in groups}
    families: dict[str, list[str]] = {}
    for name in inputs:
        match = _EXPERT.match(name)
        if match:
            families.setdefault(match["family"], []).append(name)
    completed = dict(by_name)
    notes: dict[str, str] = {}
    for members in families.values():
        rare = [n for n in members if (tokens.get(n, 0) if n in by_name else 0) < inputs[n]]
        if not rare:
            continue
        seen = [(by_name[n][1], tokens[n]) for n in members if n in by_name and tokens.get(n, 0) > 0]
        total = sum(count for _, count in seen)
        if total:  # once per family: summing every expert's H again for each rare one would cost E^2 d^2
            average = sum(h * n for h, n in seen) / total
            source = "the average of the block's experts"
        else:
            average = torch.eye(inputs[rare[0]], dtype=torch.float64)
            source = "the identity (no expert of this block saw a token)"
        for name in rare:
            count = tokens.get(name, 0) if name in by_name else 0
            size = inputs[name]
            own = by_name[name][1] if count else torch.zeros_like(average)
            completed[name] = ([name], (own * count + average * (size - count)) / size)
            notes[name] = (f"{name}: expert saw {count} calibration tokens for {size} inputs; its Hessian is "
                           f"blended toward {source}")
    order = [group[0] for group, _ in groups] + [n for n in completed if n not in by_name]
    return [completed[name] for name in order], notes
