"""Pareto mode (`allocation.search.objectives: [kl, latency]` or `[kl, params]`): a front, not a winner.

A multi-objective Optuna study (multivariate TPE by default, measured against NSGA-II and random in
bench/results/pareto-samplers.md) minimises the held-out proxy and a cost at once. The cost of a plan
is its predicted time on the recipe's target as a fraction of dense (the worst phase the recipe's
`budget.phase` names, from the latency model of runtime/speed/latency.py), or the share of the
decoder's linear parameters it keeps. Candidates are level plans (each slot at the level nearest
its sampled fraction, no budget projection: the front spans every size), seeded with uniform and
CFSP allocations at half, the whole and one and a half times the recipe's budget so the heuristics
are points of the same plot. Every trial is scored on all held-out windows (Optuna prunes
single-objective studies only). `pick` chooses the front point a user asks for (`latency=0.7`:
the lowest proxy among points predicted at most 0.7 of dense time; `params=0.5`: removing at least
half the decoder's linear parameters), which `secateur prune --pick` compiles.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.plan import Plan
from secateur.recipe.compile import BudgetError, BudgetSpec, uniform_plan
from secateur.runtime.allocation.plans import angular_plan
from secateur.runtime.allocation.space import SearchSpace
from secateur.search.speed import SpeedBudget

SCALES = (0.5, 1.0, 1.5)  # seed budgets, as multiples of the recipe's


@dataclass
class Cost:
    """The second objective of a plan."""

    kind: str  # latency or params
    total: int  # the dense decoder's linear parameters
    space: SearchSpace
    speed: SpeedBudget | None = None

    def removed(self, plan: Plan) -> float:
        """Share of the decoder's linear parameters the plan removes."""
        return self.space.removal(self.space.keeps_of(plan)) / self.total

    def __call__(self, plan: Plan) -> float:
        if self.kind == "latency":
            assert self.speed is not None
            return self.speed.worst(plan)
        return 1.0 - self.removed(plan)


def seeds(
    model: nn.Module,
    adapter: ModelAdapter,
    spec: BudgetSpec,
    layers: list[int],
    angular: dict[int, float],
    goal: int,
    metric: str,
    restore: str,
    damping: float,
) -> dict[str, Plan]:
    """Uniform and CFSP plans at each of SCALES times the recipe's removal (those that are feasible)."""
    out: dict[str, Plan] = {}
    for scale in SCALES:
        s = replace(spec, fraction=None, count=int(round(goal * scale)))
        tag = "" if scale == 1.0 else f"@{scale:g}x"
        for name, build in (
            ("uniform", lambda s=s: uniform_plan(model, adapter, s, layers, metric, restore, damping)),
            ("cfsp", lambda s=s: angular_plan(model, adapter, s, layers, angular, metric, restore, damping)),
        ):
            try:
                out[name + tag] = build()
            except BudgetError:
                continue
    return out


def point(t: FrozenTrial, kinds: list[str]) -> dict[str, Any]:
    """One trial as a front row: its two values by name, what it removes, its plan."""
    row: dict[str, Any] = {"trial": t.number, "init": t.user_attrs.get("init")}
    row.update({k: float(v) for k, v in zip(kinds, t.values)})
    for key in ("removed", "removed_fraction", "latency"):
        if key in t.user_attrs:
            row[key] = t.user_attrs[key]
    row["plan"] = t.user_attrs["plan"]
    return row


def front(study: optuna.Study, kinds: list[str]) -> list[dict[str, Any]]:
    """The non-dominated complete trials (Optuna's `best_trials`), cheapest second objective first."""
    return sorted((point(t, kinds) for t in study.best_trials), key=lambda r: (r[kinds[1]], r["trial"]))


def pick(points: list[dict[str, Any]], query: str) -> dict[str, Any]:
    """The front point `query` asks for: `latency=X` (predicted at most X of dense time) or
    `params=X` (removes at least X of the decoder's linear parameters), lowest proxy first."""
    key, _, raw = query.partition("=")
    try:
        limit = float(raw)
    except ValueError:
        raise ValueError(f"--pick {query!r}: expected latency=FRACTION or params=FRACTION") from None
    if key == "latency":
        ok = [p for p in points if "latency" in p and p["latency"] <= limit + 1e-9]
        have = [p["latency"] for p in points if "latency" in p]
    elif key == "params":
        ok = [p for p in points if p.get("removed_fraction", -1.0) >= limit - 1e-9]
        have = [p["removed_fraction"] for p in points if "removed_fraction" in p]
    else:
        raise ValueError(f"--pick {query!r}: expected latency=FRACTION or params=FRACTION")
    if not ok:
        span = f"{min(have):.3f}..{max(have):.3f}" if have else "none recorded"
        raise ValueError(f"--pick {query}: no front point meets it (the front's {key}: {span})")
    quality = next(k for k in ("kl", "ppl") if k in ok[0])
    return min(ok, key=lambda p: (p[quality], p["trial"]))


def meets_budget(t: FrozenTrial, space: SearchSpace, speed: SpeedBudget | None) -> bool:
    """Whether a Pareto trial meets the recipe's own budget (its removal, and a latency goal if set):
    the front point written as winner.yaml is the best of those."""
    removed = space.removal(space.keeps_of(Plan.from_dict(t.user_attrs["plan"])))
    if removed < space.goal - space.step_params:
        return False
    return speed is None or t.user_attrs.get("latency", 0.0) <= speed.goal + 1e-9


def winner(study: optuna.Study, space: SearchSpace, speed: SpeedBudget | None) -> FrozenTrial:
    """The front point with the lowest proxy among those meeting the recipe's budget (else the
    lowest-proxy point of the whole front)."""
    pts = study.best_trials
    return min(pts, key=lambda t: (not meets_budget(t, space, speed), t.values[0], t.number))
