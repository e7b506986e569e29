"""FASP (Chen et al.): coupled column/row pruning, Wanda-like column scores, least-squares restoration."""

from __future__ import annotations

from secateur.runtime.methods.registry import register_method
from secateur.runtime.sequential import PruneResult, prune_sequential
from secateur.runtime.stage import StageContext, check_plan_shapes, plan_for_stage


@register_method("fasp", check=check_plan_shapes, streams=True)
def fasp(ctx: StageContext) -> PruneResult:
    """The recipe's allocation (uniform, table, global) executed by the sequential pass."""
    plan = plan_for_stage(ctx)
    return prune_sequential(
        ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress, layer_io=ctx.layer_io
    )
