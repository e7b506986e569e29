"""CFSP: coarse angular block importance sets each block's share; fine activation scores pick units."""

from __future__ import annotations

from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.sequential import PruneResult, prune_sequential
from secateur.runtime.prune.stage import StageContext, check_plan_shapes, plan_for_stage


@register_method("cfsp", check=check_plan_shapes)
def cfsp(ctx: StageContext) -> PruneResult:
    """Angular-proportional plan, then the sequential pass."""
    plan = plan_for_stage(ctx, "proportional")
    return prune_sequential(
        ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress, layer_io=ctx.layer_io
    )
