"""Pruning methods as plug-ins: each turns one recipe stage into a pruned model, in place.

A method receives a `StageContext` (model, calibration and held-out tokens, the stage's
targets/importance/restore and its parameter budget as an absolute count) and returns a
`PruneResult`. FASP is registered here; BlockPruner, SPRINT, CFSP, FLAP and Bonsai register
themselves from their own modules. Multi-stage recipes (MultiPruner) run several stages.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.runtime.plan import Plan
from secateur.runtime.sequential import PruneResult, prune_sequential


@dataclass
class StageContext:
    """Everything a method needs for one stage; budget is in parameters to remove."""

    model: nn.Module
    adapter: ModelAdapter
    calib: torch.Tensor  # [n, seqlen] statistics windows
    heldout: torch.Tensor  # [m, seqlen] windows disjoint from calib, for quality proxies
    stage: Any  # recipe.schema.Stage
    recipe: Any  # recipe.schema.Recipe
    params_to_remove: int
    layers: list[int]
    progress: bool = True
    log: Callable[[str], None] = print
    cache_dir: str | None = None


MethodFn = Callable[[StageContext], PruneResult]
_METHODS: dict[str, MethodFn] = {}
_MODULES = {  # lazily imported so a method's dependencies load only when used
    "blockpruner": "secateur.runtime.sublayer",
    "sprint": "secateur.runtime.sublayer",
    "bonsai": "secateur.runtime.bonsai",
}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering a method under the recipe name `method: NAME`."""

    def wrap(fn: MethodFn) -> MethodFn:
        _METHODS[name] = fn
        return fn

    return wrap


def get_method(name: str) -> MethodFn:
    """The method function for a recipe's `method`, importing its module on first use."""
    if name not in _METHODS and name in _MODULES:
        importlib.import_module(_MODULES[name])
    if name not in _METHODS:
        raise ValueError(
            f"method {name!r} is not available; available: {', '.join(sorted(set(_METHODS) | set(_MODULES)))}"
        )
    return _METHODS[name]


def plan_for_stage(ctx: StageContext, allocation: str | None = None) -> Plan:
    """The plan of a FASP-style stage under its allocation (uniform, table, global, proportional)."""
    from secateur.recipe.compile import allocate, budget_spec, check_shapes, table_fractions
    from secateur.runtime.allocation import global_plan, proportional_plan
    from secateur.runtime.dense import dense_statistics

    spec = budget_spec(ctx.recipe, ctx.stage.targets, count=ctx.params_to_remove)
    check_shapes(ctx.model, ctx.adapter, spec, ctx.layers)
    alloc = ctx.recipe.allocation
    method = allocation or alloc.method
    imp, rest = ctx.stage.importance.metric, ctx.stage.restore
    if method in ("global", "proportional"):
        dense = dense_statistics(
            ctx.model, ctx.adapter, ctx.calib, ctx.layers, spec.mlp, spec.attention != "none"
        )
        build = global_plan if method == "global" else proportional_plan
        return build(ctx.model, ctx.adapter, spec, ctx.layers, dense, imp, rest.method, rest.damping)
    fixed: dict[int, float] = {}
    if method == "table":
        fixed = {
            i: f for i, f in table_fractions(alloc.table, ctx.adapter.num_layers).items() if i in ctx.layers
        }
    elif method != "uniform":
        raise ValueError(
            f"allocation.method: {method!r} is produced by `secateur search`, which writes a table"
        )
    return allocate(ctx.model, ctx.adapter, spec, ctx.layers, fixed, imp, rest.method, rest.damping)


@register_method("fasp")
def fasp(ctx: StageContext) -> PruneResult:
    """FASP: coupled column/row pruning, Wanda-like column scores, least-squares restoration."""
    plan = plan_for_stage(ctx)
    return prune_sequential(ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress)


@register_method("cfsp")
def cfsp(ctx: StageContext) -> PruneResult:
    """CFSP: coarse angular block importance sets each block's share; fine activation scores pick units."""
    plan = plan_for_stage(ctx, "proportional")
    return prune_sequential(ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress)


@register_method("flap")
def flap(ctx: StageContext) -> PruneResult:
    """FLAP: fluctuation metric, global standardised ranking, bias compensation (recipe sets the latter two)."""
    plan = plan_for_stage(ctx, "global")
    return prune_sequential(ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress)
