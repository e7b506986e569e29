"""One recipe stage as the runtime sees it: what a method's check and run receive.

A recipe runs one stage, or one per entry of `passes:`. Each stage's budget arrives here as an
absolute parameter count (its share of the whole goal, measured on the dense model).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.plan import Plan
from secateur.recipe.compile import BudgetSpec, allocate, budget_spec, check_shapes, table_fractions
from secateur.recipe.schema import Recipe, Stage
from secateur.runtime.allocation.dense import dense_statistics
from secateur.runtime.allocation.plans import GlobalPool, proportional_plan
from secateur.runtime.prune.sequential import LayerIO


@dataclass(frozen=True)
class StagePlan:
    """A recipe's stages in order, each with its parameter count (its share of the goal, measured
    on the dense model) and eligible layers; the model's shapes alone decide them."""

    stages: list[Stage]
    counts: list[int]
    layers: list[list[int]]

    def __iter__(self) -> Iterator[tuple[Stage, int, list[int]]]:
        """(stage, parameters to remove, eligible layers) of every stage."""
        return iter(zip(self.stages, self.counts, self.layers))


@dataclass
class CheckContext:
    """What a method's preflight check may read: the recipe and the model's shapes, never data."""

    model: nn.Module  # may be a skeleton on the meta device
    adapter: ModelAdapter
    stage: Stage
    recipe: Recipe
    params_to_remove: int
    layers: list[int]


@dataclass
class StageContext:
    """Everything a method needs for one stage; budget is in parameters to remove."""

    model: nn.Module
    adapter: ModelAdapter
    calib: torch.Tensor  # [n, seqlen] statistics windows
    heldout: torch.Tensor  # [m, seqlen] windows disjoint from calib, for quality proxies
    stage: Stage
    recipe: Recipe
    params_to_remove: int
    layers: list[int]
    progress: bool = True
    log: Callable[[str], None] = print
    cache_dir: str | None = None
    layer_io: LayerIO | None = None  # when the layers stream from disk


def check_plan_shapes(ctx: CheckContext) -> None:
    """Preflight of plan-based methods: the stage's budget fits the eligible layers' shapes."""
    spec = budget_spec(ctx.recipe, ctx.stage.targets, count=ctx.params_to_remove)
    check_shapes(ctx.model, ctx.adapter, spec, ctx.layers)


def plan_for_stage(ctx: StageContext, allocation: str | None = None) -> Plan:
    """The plan of a FASP-style stage under its allocation, with the stage's selection rule and
    restoration target."""
    plan = _allocated_plan(ctx, allocation)
    plan.selection = ctx.stage.scoring.selection
    plan.error_correction = ctx.stage.restore.error_correction
    plan.refine_steps = ctx.stage.restore.refine_steps
    plan.refine_lr = ctx.stage.restore.refine_lr
    return plan


def _allocated_plan(ctx: StageContext, allocation: str | None) -> Plan:
    """Kept counts per layer under the allocation (uniform, table, global, proportional)."""
    spec = budget_spec(ctx.recipe, ctx.stage.targets, count=ctx.params_to_remove)
    check_shapes(ctx.model, ctx.adapter, spec, ctx.layers)
    alloc = ctx.recipe.allocation
    method = allocation or alloc.method
    s = ctx.stage.scoring
    if method in ("global", "proportional"):
        return _whole_model_plan(ctx, spec, method)
    fixed: dict[int, float] = {}
    if method == "table":
        fixed = {
            i: f for i, f in table_fractions(alloc.table, ctx.adapter.num_layers).items() if i in ctx.layers
        }
    elif method != "uniform":
        raise ValueError(
            f"allocation.method: {method!r} is produced by `secateur search`, which writes a table"
        )
    return allocate(ctx.model, ctx.adapter, spec, ctx.layers, fixed, s.metric, s.restore, s.damping)


def _whole_model_plan(ctx: StageContext, spec: BudgetSpec, method: str) -> Plan:
    """Global ranking or angular-proportional shares from one pass over the dense layers (streamed:
    each layer read, measured and dropped before the pruning pass reads it again). The global
    ranking keeps each layer's unit scores, never its Gram matrices; the proportional allocation
    needs only the blocks' angular distances, so that pass collects no statistics at all."""
    s = ctx.stage.scoring
    io = ctx.layer_io.dense() if ctx.layer_io is not None else None
    if method == "global":
        pool = GlobalPool(ctx.model, ctx.adapter, spec, s.metric)
        dense_statistics(
            ctx.model,
            ctx.adapter,
            ctx.calib,
            ctx.layers,
            spec.mlp,
            spec.attention != "none",
            layer_io=io,
            on_layer=pool.add,
        )
        return pool.plan(s.restore, s.damping)
    dense = dense_statistics(ctx.model, ctx.adapter, ctx.calib, ctx.layers, False, False, layer_io=io)
    return proportional_plan(ctx.model, ctx.adapter, spec, ctx.layers, dense, s.metric, s.restore, s.damping)
