"""Allocations that need calibration data: global ranking (FLAP) and angular-proportional (CFSP).

Both read one dense pass (`runtime.allocation.dense.dense_statistics`) and return a `Plan` of kept counts;
the sequential pass then selects and restores units layer by layer as usual.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import Group, layer_groups
from secateur.graph.plan import LayerPlan, Plan, round_keep
from secateur.recipe.compile import BudgetError, BudgetSpec, planned_removal, target_params
from secateur.runtime.allocation.dense import DenseStats
from secateur.runtime.allocation.space import SearchSpace, angular_fractions, project_to_budget
from secateur.runtime.prune.score import column_scores, consumer_site
from secateur.runtime.prune.stats import InputStats


def _standardize(s: torch.Tensor) -> torch.Tensor:
    """FLAP's per-layer standardisation, so scores of different layers are comparable."""
    s = s.double()
    return (s - s.mean()) / (s.std(unbiased=False) + 1e-12) if s.numel() > 1 else s * 0


def standardized_unit_scores(
    model: nn.Module, group: Group, stats: InputStats | None, metric: str, power: int = 1
) -> torch.Tensor:
    """FLAP's standardised score of each unit: the mean z-score of the consuming columns it owns.

    Columns (not units) are standardised, per layer and per module, as FLAP does before averaging
    each head's columns. Standardising per-unit sums instead is only equivalent for one-column units
    (MLP channels): with a handful of heads or KV groups per layer it forces the weakest one to
    z ~ -1 in every layer however alike the heads are, below nearly every MLP channel (heavy-tailed
    MLP scores rarely reach z < -1), so every layer lost attention whatever its importance.
    """
    site = consumer_site(group)
    cols = column_scores(model.get_submodule(site.module).weight, stats, metric)
    z = _standardize(cols.double() ** power)
    idx = torch.tensor([list(site.indices(u)) for u in range(group.n_units)], device=z.device)
    return z[idx].mean(1)


class GlobalPool:
    """FLAP's global ranking, gathered one layer at a time: each eligible layer adds its units'
    standardised scores (`add`, while its weights and statistics are at hand, so a streamed first
    pass keeps no Gram matrix beyond the layer's own), then `plan` drops the lowest to budget."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, spec: BudgetSpec, metric: str) -> None:
        self.model, self.adapter, self.spec, self.metric = model, adapter, spec, metric
        self.pool: list[tuple[float, int, str, int]] = []  # (score, layer, kind, params)
        self.totals: dict[tuple[int, str], int] = {}

    def add(self, i: int, st: dict[str, InputStats]) -> None:
        """Layer i's units with their scores (query heads as slots of one head in every KV group)."""
        model, adapter, spec, metric = self.model, self.adapter, self.spec, self.metric
        # FLAP's released code squares the o_proj fluctuation before standardising (lib/prune.py)
        attn_power = 2 if metric == "fluctuation" else 1
        g = {x.kind: x for x in layer_groups(model, adapter, i)}
        p = adapter.layer_prefix(i)
        if spec.mlp and "mlp_channel" in g:
            z = standardized_unit_scores(model, g["mlp_channel"], st.get(f"{p}.{adapter.mlp_out}"), metric)
            self.pool += [(float(v), i, "mlp", g["mlp_channel"].params_per_unit) for v in z]
            self.totals[(i, "mlp")] = g["mlp_channel"].n_units
        if spec.attention != "none" and "kv_group" in g:
            o = st.get(f"{p}.{adapter.o}")
            if spec.attention == "v_channel":
                raise BudgetError("allocation.method: 'global' does not rank v_channel units; use uniform")
            if spec.attention == "kv_group":
                z = standardized_unit_scores(model, g["kv_group"], o, metric, attn_power)
                self.pool += [(float(v), i, "attn", g["kv_group"].params_per_unit) for v in z]
                self.totals[(i, "attn")] = g["kv_group"].n_units
            else:
                n_kv = g["kv_group"].n_units
                s = standardized_unit_scores(model, g["q_head"], o, metric, attn_power).reshape(n_kv, -1)
                z = s.sort(dim=1).values.mean(0)  # slot j = the j-th weakest head of every group
                self.pool += [(float(v), i, "attn", n_kv * g["q_head"].params_per_unit) for v in z]
                self.totals[(i, "attn")] = s.shape[1]

    def plan(self, restore: str, damping: float) -> Plan:
        """Remove the lowest-ranked units until the budget is met (MLP counts rounded at the end)."""
        spec, totals = self.spec, self.totals
        goal = target_params(self.model, self.adapter, spec)
        if not self.pool:
            raise BudgetError("targets: no targeted structure exists in the eligible layers")
        removed_units = {k: 0 for k in totals}
        removed = 0
        for _score, i, kind, cost in sorted(self.pool, key=lambda t: (t[0], t[1])):
            if removed >= goal:
                break
            n = totals[(i, kind)]
            if n - removed_units[(i, kind)] - 1 < max(1, math.ceil(spec.min_keep * n)):
                continue
            removed_units[(i, kind)] += 1
            removed += cost
        if removed < goal * 0.99:
            raise BudgetError(
                f"budget.params: global ranking can remove only {removed:,} of {goal:,} parameters "
                f"under budget.min_keep={spec.min_keep}"
            )
        plan = Plan(metric=self.metric, restore=restore, damping=damping)
        for (i, kind), r in removed_units.items():
            if r == 0:
                continue
            n = totals[(i, kind)]
            lp = plan.layers.setdefault(i, LayerPlan())
            if kind == "mlp":
                lp.mlp = round_keep(n - r, n, spec.multiple_of, math.ceil(spec.min_keep * n))
            elif spec.attention == "kv_group":
                lp.kv_groups = n - r
            else:
                lp.q_per_group = n - r
        return plan


def global_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    dense: DenseStats,
    metric: str,
    restore: str,
    damping: float,
) -> Plan:
    """Rank units of every eligible layer together by standardised score; drop the lowest to budget.

    Scores are FLAP's: consuming-column scores z-scored per layer and module, averaged per unit
    (`standardized_unit_scores`). Query heads are ranked as slots ("one head in every KV group",
    the slot's score the mean of its heads'), keeping GQA uniform. MLP counts are rounded to
    `multiple_of` at the end; the budget is met within that rounding.
    """
    pool = GlobalPool(model, adapter, spec, metric)
    for i in layers:
        pool.add(i, dense.stats.get(i, {}))
    return pool.plan(restore, damping)


def proportional_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    dense: DenseStats,
    metric: str,
    restore: str,
    damping: float,
    spread: float = 0.1,
) -> Plan:
    """CFSP: blocks that change the residual stream more (angular distance) keep more."""
    return angular_plan(model, adapter, spec, layers, dense.angular, metric, restore, damping, spread)


def angular_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    angular: dict[int, float],
    metric: str,
    restore: str,
    damping: float,
    spread: float = 0.1,
) -> Plan:
    """CFSP's allocation from given block angular distances (the search seeds itself with it)."""
    space = SearchSpace.build(model, adapter, spec, layers, metric, restore, damping)
    plan = project_to_budget(angular_fractions(space, angular, spread), space)
    if abs(planned_removal(model, adapter, plan) - space.goal) > space.step_params:
        raise BudgetError(
            "budget.params: the proportional allocation cannot meet the budget within min/max keep"
        )
    return plan
