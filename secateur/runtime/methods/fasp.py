"""FASP (Chen et al.): coupled column/row pruning, Wanda-like column scores, least-squares restoration."""

from __future__ import annotations

from secateur.runtime.allocation.variant_build import prune_stitched
from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.sequential import PruneResult, prune_sequential
from secateur.runtime.prune.stage import CheckContext, StageContext, check_plan_shapes, plan_for_stage


def check(ctx: CheckContext) -> None:
    """Shapes against the budget; a stitched compile takes only what its variants can express."""
    check_plan_shapes(ctx)
    if ctx.recipe.allocation.compile == "stitched":
        st = ctx.stage
        if st.importance.selection != "score" or st.restore.error_correction or st.restore.refine_steps:
            raise ValueError(
                "allocation.compile: 'stitched' uses score selection and plain restoration; "
                "importance.selection obs, restore.error_correction and restore.refine_steps need 'sequential'"
            )
        if st.targets.attention == "v_channel":
            raise ValueError("allocation.compile: 'stitched' has no variants of v_channel units")


@register_method("fasp", check=check)
def fasp(ctx: StageContext) -> PruneResult:
    """The recipe's allocation (uniform, table, global) executed by the sequential pass, or by
    stitching one-shot variants (`allocation.compile: stitched`, what a level search scores)."""
    plan = plan_for_stage(ctx)
    alloc = ctx.recipe.allocation
    if alloc.compile == "stitched":
        return prune_stitched(
            ctx.model, ctx.adapter, ctx.calib, plan, alloc.variants_dir, ctx.progress, ctx.layer_io
        )
    return prune_sequential(
        ctx.model, ctx.adapter, ctx.calib, plan, progress=ctx.progress, layer_io=ctx.layer_io
    )
