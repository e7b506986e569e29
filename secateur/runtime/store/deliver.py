"""Deliver or fail: a prune whose result is not what was asked is an error, never a saved model.

A result that removes nothing, or misses its parameter budget beyond `BUDGET_TOLERANCE`, non-finite
weights in the source or in the output once rounded to the output dtype, and a NaN perplexity are
refused with the reason (tensor or figure named) before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups, sublayer_groups

# the achieved removal may differ from the goal by this share of the goal (or by the size of the
# stage's units, `budget_slack`, when that is larger)
BUDGET_TOLERANCE = 0.25


class DeliveryError(ValueError):
    """A result that is not what was asked (no removal, budget missed, non-finite numbers)."""


# elements checked at a time: torch.isfinite on a whole bfloat16 embedding computes in float32 and
# allocates a mask as large again (0.85 GiB transient on a 100M-element matrix, the peak of a streamed
# 1.1B prune); chunks bound that at a few tens of MiB
FINITE_CHUNK = 1 << 22


def count_nonfinite(t: torch.Tensor, chunk: int = FINITE_CHUNK) -> int:
    """NaN and inf values of a floating tensor, counted `chunk` elements at a time."""
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[s : s + chunk])).sum()) for s in range(0, flat.numel(), chunk))


def _nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int] | None:
    """The first floating tensor holding NaN or inf, with its count of such values."""
    for name, t in tensors:
        if t.is_floating_point() and t.device.type != "meta":
            bad = count_nonfinite(t)
            if bad:
                return name, bad
    return None


def check_finite_source(tensors: Iterable[tuple[str, torch.Tensor]], ref: str) -> None:
    """A checkpoint with NaN/inf weights would be pruned into NaN logits: refuse it up front
    (`tensors`: a model's state_dict items, or one streamed layer's)."""
    found = _nonfinite(tensors)
    if found:
        name, n = found
        raise DeliveryError(
            f"model {ref}: tensor {name} holds {n:,} non-finite values (NaN or inf); the source checkpoint "
            f"is broken, nothing was pruned"
        )


def check_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Weights rounded to the output dtype must stay finite (float16 ends at 65504)."""
    found = _nonfinite(tensors)
    if found:
        name, n = found
        raise DeliveryError(
            f"output: tensor {name} holds {n:,} non-finite values once rounded to "
            f"{str(dtype).removeprefix('torch.')} (out of its range); nothing was saved. Set output.dtype: "
            f"float32 or bfloat16"
        )


def check_finite_output(model: nn.Module, dtype: torch.dtype) -> None:
    """`check_finite_tensors` over a model already rounded to the output dtype."""
    check_finite_tensors(model.state_dict().items(), dtype)


def budget_slack(
    model: nn.Module, adapter: ModelAdapter, layers: list[int], multiple_of: int, kinds: set[str], goal: int
) -> int:
    """Parameters a stage may land away from its `goal` by its units' size alone: per eligible layer one
    rounding step of its finest targeted unit (multiple_of MLP channels, a KV group, one query head per
    KV group), and, for whole sublayers or blocks, the largest such unit (a greedy removal stops at the
    first that reaches the goal) but never more than the goal itself (removing 15x the budget is no
    rounding)."""
    slack, coarse = 0, []
    for i in layers:
        steps = [
            g.params_per_unit * (multiple_of if g.kind == "mlp_channel" else g.partitions)
            for g in layer_groups(model, adapter, i)
            if g.kind in kinds
        ]
        slack += max(steps, default=0)
        coarse += [g.params_per_unit for g in sublayer_groups(model, adapter, i) if g.kind in kinds]
    return slack + min(max(coarse, default=0), goal)


def check_budget(goal: int, achieved: int, dense: int, slack: int = 0) -> None:
    """The prune removed something, and within BUDGET_TOLERANCE of its goal (or the rounding slack)."""
    if achieved <= 0:
        raise DeliveryError(
            f"budget: the prune removed no unit (asked {goal:,} parameters, less than one unit of the "
            f"targeted structures after rounding to multiple_of); nothing was saved. Raise budget.params "
            f"or lower budget.multiple_of"
        )
    if abs(achieved - goal) <= max(BUDGET_TOLERANCE * goal, slack):
        return
    why = (
        f"The method's units are too coarse for this budget: ask about {achieved / dense:.4f}, or prune "
        f"channels/heads instead"
        if achieved > goal
        else "The method stopped short of the budget: lower it, or widen targets"
    )
    raise DeliveryError(
        f"budget: asked to remove {goal:,} parameters, removed {achieved:,} ({achieved / dense:.2%} of "
        f"{dense:,} decoder linear parameters), off by {abs(achieved - goal) / goal:.0%}, beyond the "
        f"{BUDGET_TOLERANCE:.0%} tolerance and one unit ({slack:,} parameters); nothing was saved. {why}"
    )


def check_perplexity(ppl: Mapping[str, Mapping[str, float]]) -> None:
    """A NaN or inf perplexity means the evaluated model is broken: an error, not a report line."""
    for model, sets in ppl.items():
        for key, value in sets.items():
            if not math.isfinite(value):
                raise DeliveryError(
                    f"evaluate: {model} perplexity on {key} is {value} (the model's logits overflow or are "
                    f"NaN); nothing was saved. With output.dtype float16, try float32 or bfloat16"
                )
