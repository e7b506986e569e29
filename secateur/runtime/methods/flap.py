"""FLAP (An et al., 2024): fluctuation metric, per-layer standardised scores ranked globally, bias compensation."""

from __future__ import annotations

from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.sequential import PruneResult, prune_sequential
from secateur.runtime.prune.stage import StageContext, check_plan_shapes, plan_for_stage


@register_method("flap", check=check_plan_shapes)
def flap(ctx: StageContext) -> PruneResult:
    """Global ranking plan, then the sequential pass (the recipe sets metric and bias compensation)."""
    plan = plan_for_stage(ctx, "global")
    return prune_sequential(
        ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress, layer_io=ctx.layer_io
    )
