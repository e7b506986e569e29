"""Compile a budget into a plan: kept units per layer and kind, against a concrete model.

Uniform allocation removes the same fraction of every targeted structure in every eligible
layer. Coarse structures (attention heads) are rounded first; the fine-grained MLP channels
absorb the remainder so the parameter budget is met as closely as `multiple_of` allows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import attention_products, attention_span, decoder_linear_params, flops_per_token
from secateur.graph.groups import Group, layer_groups, layer_shapes
from secateur.graph.plan import LayerPlan, Plan, Scoring, min_units, round_keep
from secateur.recipe.schema import Recipe, Targets
from secateur.recipe.selectors import parse_table_key, select_layers


class BudgetError(ValueError):
    """A budget that cannot be met under the recipe's constraints."""


@dataclass
class BudgetSpec:
    """What to remove and under which constraints (model-independent numbers)."""

    fraction: float | None = None  # of decoder linear parameters
    count: int | None = None
    mlp: bool = True
    attention: str = "none"  # none | q_head | kv_group
    min_keep: float = 0.05
    max_keep: float = 1.0
    multiple_of: int = 8


def target_params(model: nn.Module, adapter: ModelAdapter, spec: BudgetSpec) -> int:
    """Parameters to remove, from a fraction of the decoder's linear parameters or a count."""
    if spec.count is not None:
        return int(spec.count)
    if spec.fraction is None or not 0 < spec.fraction < 1:
        raise BudgetError(f"budget.params: {spec.fraction!r} must be a fraction in (0, 1) or a count")
    return int(round(spec.fraction * decoder_linear_params(model, adapter)))


def attn_units(g: dict[str, Group], attention: str) -> tuple[int, int]:
    """(units per layer, parameters per unit) of an attention unit kind, GQA-uniform units.

    q_head and v_channel units are "one head / one value channel in every KV group".
    """
    n_kv = g["kv_group"].n_units
    if attention == "kv_group":
        return n_kv, g["kv_group"].params_per_unit
    if attention == "q_head":
        return g["q_head"].n_units // n_kv, n_kv * g["q_head"].params_per_unit
    if attention == "v_channel":
        return g["v_channel"].n_units // n_kv, n_kv * g["v_channel"].params_per_unit
    raise BudgetError(f"targets.attention: unknown unit kind {attention!r}")


def _attn_params(g: dict[str, Group], attention: str, keep: int) -> int:
    """Parameters removed from a layer's attention when `keep` units (per group) remain."""
    n, cost = attn_units(g, attention)
    return (n - keep) * cost


def set_attn_keep(lp: LayerPlan, attention: str, keep: int) -> None:
    """Store an attention keep count in the plan field of its unit kind."""
    field = {"kv_group": "kv_groups", "q_head": "q_per_group", "v_channel": "v_per_group"}[attention]
    setattr(lp, field, keep)


def _fixed_layer(g: dict[str, Group], spec: BudgetSpec, keep: Any) -> LayerPlan:
    """A layer pinned by an allocation table: one keep fraction for all targeted structures, or
    per-structure fractions ({mlp: .., attention: ..}, as `secateur search` writes them); 0 removes
    the branch."""
    mlp_keep = getattr(keep, "mlp", keep) if not isinstance(keep, float | int) else keep
    attn_keep = getattr(keep, "attention", keep) if not isinstance(keep, float | int) else keep
    lp = LayerPlan()
    if spec.mlp and "mlp_channel" in g and mlp_keep == 0:  # 0: the whole MLP branch goes
        lp.mlp, lp.drop_mlp = 0, True
        mlp_keep = None
    if spec.attention != "none" and "kv_group" in g and attn_keep == 0:  # the whole attention branch
        lp.kv_groups, lp.drop_attn = 0, True
        attn_keep = None
    if spec.mlp and "mlp_channel" in g and mlp_keep is not None:
        n = g["mlp_channel"].n_units
        lp.mlp = round_keep(mlp_keep * n, n, spec.multiple_of, min_units(n, spec.min_keep))
    if spec.attention != "none" and "kv_group" in g and attn_keep is not None:
        n, _ = attn_units(g, spec.attention)
        if spec.attention == "v_channel":
            k = round_keep(attn_keep * n, n, spec.multiple_of, min_units(n, spec.min_keep))
        else:
            k = min(max(int(round(attn_keep * n)), min_units(n, spec.min_keep)), n)
        set_attn_keep(lp, spec.attention, k)
    return lp


def allocate(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    fixed: dict[int, Any] | None = None,
    metric: str = Scoring.metric,
    restore: str = Scoring.restore,
    damping: float = Scoring.damping,
) -> Plan:
    """Pinned layers keep their table fraction; the others share the rest of the budget uniformly."""
    fixed = fixed or {}
    plan = Plan(metric=metric, restore=restore, damping=damping)
    for i, keep in fixed.items():
        g = {x.kind: x for x in layer_groups(model, adapter, i)}
        plan.layers[i] = _fixed_layer(g, spec, keep)
    pinned = planned_removal(model, adapter, plan)
    free = [i for i in layers if i not in fixed]
    goal = target_params(model, adapter, spec) - pinned
    if not free:
        return plan
    if goal < 0:
        raise BudgetError(
            f"allocation.table: the pinned layers alone remove {pinned:,} parameters, more than budget.params allows"
        )
    rest_spec = BudgetSpec(
        None, int(goal), spec.mlp, spec.attention, spec.min_keep, spec.max_keep, spec.multiple_of
    )
    plan.layers.update(uniform_plan(model, adapter, rest_spec, free, metric, restore, damping).layers)
    return plan


def check_targets(spec: BudgetSpec, layers: list[int]) -> None:
    """A budget needs at least one eligible layer and one targeted structure."""
    if not layers:
        raise BudgetError("targets.layers: no layer is eligible for pruning")
    if not spec.mlp and spec.attention == "none":
        raise BudgetError("targets: nothing to prune (mlp is false and attention is none)")


def check_attention_units(groups: dict[int, dict[str, Group]], spec: BudgetSpec) -> None:
    """kv_group pruning must keep one KV group per layer, so a model whose eligible layers each
    have a single KV head (Gemma 3 270M) has nothing to remove there: refuse rather than
    silently move the whole budget to the MLPs."""
    if spec.attention != "kv_group":
        return
    n_kv = [g["kv_group"].n_units for g in groups.values() if "kv_group" in g]
    if n_kv and max(n_kv) <= 1:
        raise BudgetError(
            "targets.attention: kv_group cannot prune this model: every eligible layer has a single KV head, "
            "which must stay; prune query heads (q_head) or value channels (v_channel) instead"
        )


def uniform_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    metric: str = Scoring.metric,
    restore: str = Scoring.restore,
    damping: float = Scoring.damping,
) -> Plan:
    """The same sparsity in every eligible layer, meeting the parameter budget."""
    check_targets(spec, layers)
    goal = target_params(model, adapter, spec)
    groups = {i: {g.kind: g for g in layer_groups(model, adapter, i)} for i in layers}
    check_attention_units(groups, spec)
    attn_total = mlp_total = 0
    for g in groups.values():
        if spec.attention != "none" and "kv_group" in g:
            n, cost = attn_units(g, spec.attention)
            attn_total += n * cost
        if spec.mlp and "mlp_channel" in g:
            mlp_total += g["mlp_channel"].params
    sparsity = goal / max(attn_total + mlp_total, 1)
    plan = Plan(metric=metric, restore=restore, damping=damping)
    removed = 0
    # attention first: coarse units, rounded (down when the MLP cannot absorb the difference)
    for i, g in groups.items():
        if spec.attention == "none" or "kv_group" not in g:
            continue
        n, _ = attn_units(g, spec.attention)
        share = sparsity if spec.mlp else goal / max(attn_total, 1)
        if spec.attention == "v_channel":  # fine-grained: rounded like MLP channels
            k = round_keep(n - share * n, n, spec.multiple_of, min_units(n, spec.min_keep))
        else:
            k = n - (int(round(share * n)) if spec.mlp else int(math.floor(share * n + 1e-9)))
            k = min(max(k, min_units(n, spec.min_keep)), n)
        if spec.max_keep < 1:
            k = min(k, max(min_units(n, spec.min_keep), int(math.floor(spec.max_keep * n))))
        if spec.mlp and removed + _attn_params(g, spec.attention, k) > goal:
            k = n - int(math.floor(sparsity * n))
        removed += _attn_params(g, spec.attention, k)
        set_attn_keep(plan.layers.setdefault(i, LayerPlan()), spec.attention, k)
    if spec.mlp:
        eligible = [i for i, g in groups.items() if "mlp_channel" in g]
        per_layer = (goal - removed) / max(len(eligible), 1)
        for i in eligible:
            grp = groups[i]["mlp_channel"]
            n = grp.n_units
            lo = min_units(n, spec.min_keep)
            want = n - per_layer / grp.params_per_unit
            if want < lo - 0.5:
                raise BudgetError(
                    f"budget.params: removing {goal:,} parameters needs layer {i} to keep {want:.0f} of {n} MLP "
                    f"channels, below budget.min_keep={spec.min_keep}; the largest feasible budget here is about "
                    f"{feasible_fraction(model, adapter, spec, layers):.3f}"
                )
            k = round_keep(want, n, spec.multiple_of, lo)
            if spec.max_keep < 1:
                k = min(k, round_keep(spec.max_keep * n, n, spec.multiple_of, lo))
            plan.layers.setdefault(i, LayerPlan()).mlp = k
    return plan


def feasible_fraction(model: nn.Module, adapter: ModelAdapter, spec: BudgetSpec, layers: list[int]) -> float:
    """Largest fraction of decoder linear parameters removable under min_keep (for error messages)."""
    total = 0
    for i in layers:
        g = {x.kind: x for x in layer_groups(model, adapter, i)}
        if spec.mlp and "mlp_channel" in g:
            n = g["mlp_channel"].n_units
            total += (n - min_units(n, spec.min_keep)) * g["mlp_channel"].params_per_unit
        if spec.attention != "none" and "kv_group" in g:
            n, _ = attn_units(g, spec.attention)
            total += _attn_params(g, spec.attention, min_units(n, spec.min_keep))
    return total / max(decoder_linear_params(model, adapter), 1)


def planned_removal(model: nn.Module, adapter: ModelAdapter, plan: Plan) -> int:
    """Parameters a plan removes, computed from group sizes without touching weights."""
    total = 0
    for i, lp in plan.layers.items():
        g = {x.kind: x for x in layer_groups(model, adapter, i)}
        if lp.mlp is not None and "mlp_channel" in g:
            total += (g["mlp_channel"].n_units - lp.mlp) * g["mlp_channel"].params_per_unit
        if lp.kv_groups is not None:
            total += _attn_params(g, "kv_group", lp.kv_groups)
        if lp.q_per_group is not None:
            kv_kept = lp.kv_groups if lp.kv_groups is not None else g["kv_group"].n_units
            r = g["q_head"].n_units // g["kv_group"].n_units
            total += (r - lp.q_per_group) * kv_kept * g["q_head"].params_per_unit
        if lp.v_per_group is not None:
            total += _attn_params(g, "v_channel", lp.v_per_group)
    return total


def eligible_layers(targets: Targets, num_layers: int, prefix: str) -> list[int]:
    """Layers chosen by `targets.layers`, minus the protected ones."""
    try:
        chosen = select_layers(targets.layers, num_layers, prefix)
    except ValueError as e:
        raise BudgetError(f"targets.layers: {e}") from e
    prot = targets.protect
    bad = [i for i in prot.layers if i >= num_layers]
    if bad:
        raise BudgetError(
            f"targets.protect.layers: layer {bad[0]} does not exist (model has {num_layers} layers)"
        )
    protected = set(prot.layers) | set(range(prot.first)) | set(range(num_layers - prot.last, num_layers))
    return [i for i in chosen if i not in protected]


def table_fractions(table: dict[str, Any], num_layers: int) -> dict[int, Any]:
    """Expand `allocation.table` keys (indices, ranges, depth fractions) to per-layer keep fractions."""
    out: dict[int, float] = {}
    for key, keep in table.items():
        k = parse_table_key(key)
        if k.kind == "layers":
            if k.hi >= num_layers:
                raise BudgetError(
                    f"allocation.table.{key}: layer {int(k.hi)} does not exist ({num_layers} layers)"
                )
            layers = range(int(k.lo), int(k.hi) + 1)
        else:
            depth = max(num_layers - 1, 1)
            layers = [i for i in range(num_layers) if k.lo - 1e-9 <= i / depth <= k.hi + 1e-9]
            if not layers:
                layers = [int(round(k.lo * depth))]
        for i in layers:
            out[i] = keep
    return out


def budget_spec(recipe: Recipe, targets: Targets | None = None, count: int | None = None) -> BudgetSpec:
    """The budget of a recipe, or of one stage given its absolute share `count` of parameters.

    A FLOPs budget has no parameter count until it meets a model: pass `count` from
    `stage_counts` (or `removal_goal`) for it.
    """
    b = recipe.budget
    t = targets or recipe.targets
    if b.multiple_of == "auto":
        raise BudgetError(
            "budget.multiple_of: auto is resolved against the serving target before compiling "
            "(secateur.speed_target.resolve_speed, which prune, explain and search run)"
        )
    if count is not None:
        return BudgetSpec(None, int(count), t.mlp, t.attention, b.min_keep, b.max_keep, b.multiple_of)
    if b.kind != "params":
        raise BudgetError(
            f"budget.{b.kind}: needs the model to become a parameter count (use stage_counts / removal_goal)"
        )
    fraction = b.params if isinstance(b.params, float) else None
    absolute = int(b.params) if isinstance(b.params, int) else None
    return BudgetSpec(fraction, absolute, t.mlp, t.attention, b.min_keep, b.max_keep, b.multiple_of)


def plan_flops_removed(model: nn.Module, adapter: ModelAdapter, plan: Plan, context: int) -> int:
    """FLOPs per token a plan removes: 2 per linear parameter plus the QK^T / AV products of the
    query heads (or value channels) it drops, each attending to `context` positions."""
    total = 2 * planned_removal(model, adapter, plan)
    for i, lp in plan.layers.items():
        if lp.kv_groups is None and lp.q_per_group is None and lp.v_per_group is None:
            continue
        s = layer_shapes(model, adapter, i)
        n_q, n_kv, d, dv = (int(s[k]) for k in ("num_heads", "num_kv_heads", "head_dim", "v_head_dim"))
        kv = lp.kv_groups if lp.kv_groups is not None else n_kv
        q = lp.q_per_group if lp.q_per_group is not None else n_q // max(n_kv, 1)
        v = lp.v_per_group if lp.v_per_group is not None else dv
        span = attention_span(model.config, i, context)
        total += attention_products(n_q, d, dv, span) - attention_products(kv * q, d, v, span)
    return total


def flops_to_params(
    model: nn.Module, adapter: ModelAdapter, spec: BudgetSpec, layers: list[int], flops: int, context: int
) -> int:
    """The parameter count whose uniform removal of the targeted structures cuts `flops` FLOPs per
    token (the smallest such count, by bisection on the compiled plan).

    Allocations that pick units at prune time (global, search, sublayer methods) remove this
    count too, so their FLOPs cut differs from the goal only by the attention products of the
    heads they happen to drop; the report gives the FLOPs actually removed.
    """
    check_targets(spec, layers)

    def removed(count: int) -> int | None:
        s = BudgetSpec(None, count, spec.mlp, spec.attention, spec.min_keep, spec.max_keep, spec.multiple_of)
        try:
            return plan_flops_removed(model, adapter, uniform_plan(model, adapter, s, layers), context)
        except BudgetError:
            return None

    hi = int(feasible_fraction(model, adapter, spec, layers) * decoder_linear_params(model, adapter))
    top = removed(hi)
    if top is None or top < flops:
        most = 0 if top is None else top
        raise BudgetError(
            f"budget.flops: removing {flops:,} FLOPs per token is not possible with these targets under "
            f"min_keep={spec.min_keep}; at most about {most / max(flops_per_token(model, adapter, context), 1):.3f} "
            "of the model's FLOPs per token can go"
        )
    lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = removed(mid)
        if got is not None and got >= flops:
            hi = mid
        else:
            lo = mid
    return hi


def removal_goal(recipe: Recipe, model: nn.Module, adapter: ModelAdapter) -> int:
    """Parameters the whole recipe removes: budget.params directly, or the count that cuts
    budget.flops of the dense model's FLOPs per token (see `stage_counts`)."""
    return sum(stage_counts(recipe, model, adapter))


def stage_counts(recipe: Recipe, model: nn.Module, adapter: ModelAdapter) -> list[int]:
    """Parameters each stage removes: its share of the whole budget, measured on the dense model.

    budget.flops is a fraction of the dense model's FLOPs per token (decoder and LM head,
    attention over budget.context positions). Each stage takes its share of those FLOPs and turns
    it into parameters for its own targets: channel and head stages through `flops_to_params`,
    sublayer stages at 2 FLOPs per parameter (a removed attention branch also drops its
    QK^T / AV products, so they cut at least their share).
    """
    b = recipe.budget
    stages = recipe.stages()
    shares = [p.share for p in recipe.passes] if recipe.passes else [1.0]
    if b.kind == "params":
        total = target_params(
            model,
            adapter,
            BudgetSpec(
                b.params if isinstance(b.params, float) else None,
                b.params if isinstance(b.params, int) else None,
            ),
        )
        return [int(round(total * s)) for s in shares]
    if b.kind != "flops":
        raise BudgetError(
            f"budget.{b.kind}: a speed goal becomes a parameter count when the recipe is resolved against "
            "its serving target (secateur.speed_target.resolve_speed), before compiling"
        )
    goal = int(round(b.flops * flops_per_token(model, adapter, b.context)))
    counts = []
    for st, share in zip(stages, shares):
        want = int(round(goal * share))
        if getattr(st.targets, "sublayers", False):
            counts.append((want + 1) // 2)
            continue
        layers = eligible_layers(st.targets, adapter.num_layers, adapter.layers_path)
        spec = budget_spec(recipe, st.targets, 0)
        try:
            counts.append(flops_to_params(model, adapter, spec, layers, want, b.context))
        except BudgetError as e:
            where = f"{'.'.join(map(str, st.path))} ({st.method}): " if st.path else ""
            raise BudgetError(f"{where}{e}") from e
    return counts


def check_shapes(model: nn.Module, adapter: ModelAdapter, spec: BudgetSpec, layers: list[int]) -> None:
    """Model-dependent checks that must fail before calibration starts."""
    for i in layers:
        g = {x.kind: x for x in layer_groups(model, adapter, i)}
        if spec.mlp and "mlp_channel" in g and spec.multiple_of >= g["mlp_channel"].n_units:
            # a width of one multiple_of or more is either kept whole or not at all: no channel can go
            raise BudgetError(
                f"budget.multiple_of={spec.multiple_of} is not smaller than layer {i}'s MLP width "
                f"({g['mlp_channel'].n_units}): no channel could be removed; lower budget.multiple_of"
            )
        if spec.attention == "v_channel" and not adapter.rope:
            raise BudgetError(
                f"targets.attention: 'v_channel' runs through Secateur's RoPE attention module, which does not "
                f"support {adapter.config.model_type}; use kv_group"
            )
        if spec.attention == "v_channel" and adapter.v_channel_refusal:
            raise BudgetError(
                f"targets.attention: 'v_channel' cannot prune {adapter.config.model_type}: "
                f"{adapter.v_channel_refusal}; use kv_group or q_head"
            )
        if spec.attention == "v_channel" and spec.multiple_of > adapter.head_dim:
            raise BudgetError(
                f"budget.multiple_of={spec.multiple_of} is larger than the head dim ({adapter.head_dim})"
            )
        if spec.attention == "q_head" and "kv_group" in g and g["q_head"].n_units == g["kv_group"].n_units:
            raise BudgetError(
                f"targets.attention: 'q_head' needs grouped-query attention, but layer {i} has one query head per "
                "KV head; use 'kv_group'"
            )
    check_targets(spec, layers)
    goal = target_params(model, adapter, spec)
    most = feasible_fraction(model, adapter, spec, layers)
    if goal > most * decoder_linear_params(model, adapter) + 1:
        raise BudgetError(
            f"budget.params: removing {goal:,} parameters from the {len(layers)} eligible layers is not "
            f"possible under budget.min_keep={spec.min_keep}; they can lose at most about {most:.3f} of "
            f"the decoder's linear parameters (widen targets.layers / targets.protect or lower the budget)"
        )
