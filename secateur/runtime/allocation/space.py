"""The search space (per-layer keep fractions) and its projection onto the exact budget.

Optuna samples one keep fraction per layer and targeted structure (`mlp_{i}`, `attn_{i}`).
Those fractions only say *where* to prune more or less: `project_to_budget` rescales them so
the plan removes exactly the budgeted parameters, rounds to whole units and `multiple_of`,
respects budget.min_keep/max_keep and fixes the rounding drift greedily. Every trial is
therefore a feasible model of the right size, and the sampler never wastes a trial.

With `knots` > 0 the sampler sees fewer dimensions: a keep fraction at `knots` evenly spaced
depths per structure (`mlp_k0`, ...), linearly interpolated to every layer. A smooth curve over
depth is what layer-wise allocations found by hand look like (OWL, CFSP), and a few parameters
are far harder to over-fit to a small held-out set than one per layer.

Parameter accounting is the one of `recipe.compile.planned_removal` (tests check equality).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups
from secateur.graph.plan import LayerPlan, Plan, Scoring
from secateur.recipe.compile import BudgetError, BudgetSpec, check_targets, target_params

Fractions = dict[str, float]  # "mlp_3" / "attn_3" -> keep fraction, as in trial.params


@dataclass(frozen=True)
class Slot:
    """One searched structure of one layer: its unit count, cost per unit and allowed keeps."""

    layer: int
    kind: str  # "mlp" or "attn"
    n: int  # units (MLP channels, query heads per KV group, or KV groups)
    unit_params: int  # parameters removed per unit
    allowed: tuple[int, ...]  # allowed keep counts, ascending
    step: int  # regular rounding step in units (multiple_of for MLP, 1 for heads)
    levels: tuple[int, ...] = ()  # keep levels of a level search (ascending, within allowed); () = allowed

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.layer}"

    @property
    def grid(self) -> tuple[int, ...]:
        """The coarse keep counts the projection rounds to first: the levels, else every allowed count."""
        return self.levels or self.allowed


def _allowed_keeps(n: int, min_keep: float, max_keep: float, multiple_of: int) -> tuple[tuple[int, ...], int]:
    """Keep counts `round_keep` can produce inside [min_keep, max_keep]; n itself is always allowed
    when max_keep is 1 (an unpruned layer need not be a multiple)."""
    m = max(1, multiple_of)
    if m >= n:
        m = 1
    lo_units = max(1, math.ceil(min_keep * n - 1e-9))
    lo = max(math.ceil(lo_units / m) * m, m)
    hi = n if max_keep >= 1 else max(lo, math.floor(max_keep * n + 1e-9) // m * m)
    values = set(range(lo, min(hi, n) + 1, m))
    if hi >= n:
        values.add(n)
    return tuple(sorted(v for v in values if v <= n)) or (n,), m


def with_levels(s: Slot, k: int, removable: bool) -> Slot:
    """The slot with K keep levels evenly spaced from whole down to the branch removed (0, when
    `removable`; else its smallest allowed count), rounded to its step; allowed counts gain them."""
    lo, hi = s.allowed[0], s.allowed[-1]
    raw = {int(round(s.n * j / (k - 1) / s.step)) * s.step for j in range(1, k - 1)} | {s.n}
    levels = {v for v in raw if lo <= v <= hi} | {0 if removable else lo}
    return replace(s, allowed=tuple(sorted(set(s.allowed) | levels)), levels=tuple(sorted(levels)))


@dataclass
class SearchSpace:
    """Searched slots of a model under a budget, plus the parameter goal they must meet."""

    spec: BudgetSpec
    layers: list[int]
    slots: list[Slot]
    goal: int
    metric: str = Scoring.metric
    restore: str = Scoring.restore
    damping: float = Scoring.damping
    knots: int = 0  # 0: one parameter per slot; else per structure, interpolated over depth
    levels: int = 0  # 0: any allowed count; K: K keep levels per slot (the lowest removes the branch)

    @classmethod
    def build(
        cls,
        model: nn.Module,
        adapter: ModelAdapter,
        spec: BudgetSpec,
        layers: list[int],
        metric: str = Scoring.metric,
        restore: str = Scoring.restore,
        damping: float = Scoring.damping,
        knots: int = 0,
        levels: int = 0,
    ) -> SearchSpace:
        """Read unit counts and sizes from the dense model's groups (once per search)."""
        check_targets(spec, layers)
        if knots == 1 or knots < 0:
            raise BudgetError(f"allocation.search.knots: {knots} (0 for one parameter per layer, or >= 2)")
        if levels == 1 or levels < 0:
            raise BudgetError(f"allocation.search.levels: {levels} (0 for any count, or >= 2)")
        if spec.attention not in ("none", "q_head", "kv_group"):
            raise BudgetError(f"targets.attention: {spec.attention!r} cannot be searched yet")
        slots: list[Slot] = []
        for i in layers:
            g = {x.kind: x for x in layer_groups(model, adapter, i)}
            if spec.mlp and "mlp_channel" in g:
                n = g["mlp_channel"].n_units
                allowed, step = _allowed_keeps(n, spec.min_keep, spec.max_keep, spec.multiple_of)
                slots.append(Slot(i, "mlp", n, g["mlp_channel"].params_per_unit, allowed, step))
            if spec.attention != "none" and "kv_group" in g:
                n_kv = g["kv_group"].n_units
                if spec.attention == "kv_group":
                    n, cost = n_kv, g["kv_group"].params_per_unit
                else:  # one unit = one query head in every KV group (GQA keeps groups equal)
                    n, cost = g["q_head"].n_units // n_kv, n_kv * g["q_head"].params_per_unit
                allowed, _ = _allowed_keeps(n, spec.min_keep, spec.max_keep, 1)
                slots.append(Slot(i, "attn", n, cost, allowed, 1))
        if not slots:
            raise BudgetError("targets: no targeted structure exists in the eligible layers")
        if levels:
            slots = [
                with_levels(s, levels, removable=s.kind == "mlp" or spec.attention == "kv_group")
                for s in slots
            ]
        goal = target_params(model, adapter, spec)
        return cls(spec, list(layers), slots, goal, metric, restore, damping, knots, levels)

    # ---- sampling ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def param_names(self) -> list[str]:
        """What the sampler sees: slot names, or `{kind}_k{j}` knots."""
        if not self.knots:
            return self.names
        kinds = dict.fromkeys(s.kind for s in self.slots)
        return [f"{k}_k{j}" for k in kinds for j in range(self.knots)]

    def _depth(self) -> dict[str, float]:
        """Each slot's position in [0, 1] among the searched slots of its kind."""
        out: dict[str, float] = {}
        for kind in dict.fromkeys(s.kind for s in self.slots):
            same = [s for s in self.slots if s.kind == kind]
            for r, s in enumerate(same):
                out[s.name] = r / max(len(same) - 1, 1)
        return out

    def expand(self, params: dict[str, float]) -> Fractions:
        """Sampled parameters -> one keep fraction per slot (identity without knots)."""
        if not self.knots:
            return {s.name: float(params[s.name]) for s in self.slots}
        depth, out = self._depth(), {}
        for s in self.slots:
            x = depth[s.name] * (self.knots - 1)
            j = min(int(x), self.knots - 2)
            a, b = params[f"{s.kind}_k{j}"], params[f"{s.kind}_k{j + 1}"]
            out[s.name] = float(a + (b - a) * (x - j))
        return out

    def params_of(self, fractions: Fractions) -> dict[str, float]:
        """Per-slot fractions -> sampler parameters (knots: the mean of the slots nearest each knot),
        clipped into the sampling range so they can be enqueued."""
        if not self.knots:
            return self.clip(fractions)
        depth, sums = self._depth(), {}
        for s in self.slots:
            key = f"{s.kind}_k{round(depth[s.name] * (self.knots - 1))}"
            sums.setdefault(key, []).append(fractions[s.name])
        out = {}
        for name in self.param_names:  # a knot with no nearest slot takes its neighbour's value
            kind, j = name.rsplit("_k", 1)
            near = min(
                (k for k in sums if k.startswith(f"{kind}_k")),
                key=lambda k: abs(int(k.rsplit("_k", 1)[1]) - int(j)),
            )
            out[name] = sum(sums[near]) / len(sums[near])
        return self.clip(out)

    @property
    def sample_range(self) -> tuple[float, float]:
        """What each sampled fraction ranges over: [min_keep, max_keep], from 0 when a level removes a branch."""
        removable = any(s.grid[0] == 0 for s in self.slots)
        return (0.0 if removable else self.spec.min_keep), self.spec.max_keep

    def clip(self, fractions: Fractions) -> Fractions:
        """Fractions clipped into the sampling range (so they can be enqueued)."""
        lo, hi = self.sample_range
        return {k: float(min(max(v, lo), hi)) for k, v in fractions.items()}

    # ---- accounting ---------------------------------------------------------------------
    @property
    def prunable_params(self) -> int:
        """Parameters owned by all searched units (the pool the budget is taken from)."""
        return sum(s.n * s.unit_params for s in self.slots)

    @property
    def step_params(self) -> int:
        """Parameters of the smallest regular rounding step: the precision the budget is met to."""
        return min(s.step * s.unit_params for s in self.slots)

    @property
    def level_step_params(self) -> int:
        """Parameters of the smallest step between two levels: the precision level moves keep."""
        return min(
            min(b - a for a, b in zip(s.grid, s.grid[1:])) * s.unit_params
            for s in self.slots
            if len(s.grid) > 1
        )

    def removal(self, keeps: dict[str, int]) -> int:
        return sum((s.n - keeps[s.name]) * s.unit_params for s in self.slots)

    def to_plan(self, keeps: dict[str, int]) -> Plan:
        """Kept counts per slot -> a runtime Plan (slots left whole are still recorded)."""
        plan = Plan(metric=self.metric, restore=self.restore, damping=self.damping)
        for s in self.slots:
            lp = plan.layers.setdefault(s.layer, LayerPlan())
            k = keeps[s.name]
            if s.kind == "mlp":
                lp.mlp, lp.drop_mlp = k, k == 0  # 0: the branch is removed
            elif self.spec.attention == "kv_group":
                lp.kv_groups, lp.drop_attn = k, k == 0
            else:
                lp.q_per_group = k
        return plan

    def keeps_of(self, plan: Plan) -> dict[str, int]:
        """Kept counts per slot read back from a plan (whole when the plan does not say)."""
        out: dict[str, int] = {}
        for s in self.slots:
            lp = plan.layers.get(s.layer, LayerPlan())
            if s.kind == "mlp":
                v = lp.mlp
            else:
                v = lp.kv_groups if self.spec.attention == "kv_group" else lp.q_per_group
            out[s.name] = s.n if v is None else int(v)
        return out

    def fractions_of(self, plan: Plan) -> Fractions:
        """Actual keep fractions of a plan, per slot."""
        keeps = self.keeps_of(plan)
        return {s.name: keeps[s.name] / s.n for s in self.slots}

    def fingerprint(self) -> dict:
        """What makes two searches comparable: budget, layers, slots and the parameter goal."""
        return {
            "budget": asdict(self.spec),
            "layers": list(self.layers),
            "slots": [[s.name, s.n, s.unit_params] for s in self.slots],
            "goal": self.goal,
            "metric": self.metric,
            "restore": self.restore,
            "damping": self.damping,
            **({"knots": self.knots} if self.knots else {}),  # studies made before knots still match
            **({"levels": self.levels} if self.levels else {}),
        }


def level_plans(space: SearchSpace) -> list[Plan]:
    """One plan per level rank (every slot at its j-th level): together they name every level variant."""
    depth = max(len(s.grid) for s in space.slots)
    return [
        space.to_plan({s.name: s.grid[min(j, len(s.grid) - 1)] for s in space.slots}) for j in range(depth)
    ]


def _bisect_alpha(slots: list[Slot], weights: list[float], goal: float) -> float:
    """Scale alpha so that sum clip(alpha * w, min, max removal) over slots hits `goal`."""

    def removed(alpha: float) -> float:
        total = 0.0
        for s, w in zip(slots, weights):
            r = min(max(alpha * w, 1 - s.allowed[-1] / s.n), 1 - s.allowed[0] / s.n)
            total += r * s.n * s.unit_params
        return total

    hi = max((1 - s.allowed[0] / s.n) / w for s, w in zip(slots, weights) if w > 0)
    lo = 0.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if removed(mid) < goal:
            lo = mid
        else:
            hi = mid
    return hi


def _greedy(
    keeps: dict[str, int],
    target: dict[str, float],
    slots: list[Slot],
    grid: dict[str, tuple[int, ...]],
    goal: int,
    tol: float,
) -> int:
    """Move slots one grid step at a time, the one farthest from its continuous target first, until
    the removal is within `tol` of `goal` (or no move helps); returns the removal reached."""
    removed = sum((s.n - keeps[s.name]) * s.unit_params for s in slots)
    while abs(goal - removed) > tol:
        down = goal > removed  # remove more: keep fewer
        best: tuple[float, int, Slot, int] | None = None
        for idx, s in enumerate(slots):
            g = grid[s.name]
            k = keeps[s.name]
            nxt = [v for v in g if v < k] if down else [v for v in g if v > k]
            if not nxt:
                continue
            new = max(nxt) if down else min(nxt)
            cost = abs(k - new) * s.unit_params
            if cost > abs(goal - removed) + tol:
                continue  # would overshoot by more than it fixes
            gap = (k - target[s.name]) / s.step
            pressure = gap if down else -gap
            if best is None or (pressure, -idx) > (best[0], -best[1]):
                best = (pressure, idx, s, new)
        if best is None:
            break
        _, _, s, new = best
        removed += (keeps[s.name] - new) * s.unit_params
        keeps[s.name] = new
    return removed


def level_keeps(fractions: Fractions, space: SearchSpace) -> dict[str, int] | None:
    """The level counts the fractions sit on exactly (a level sampler's proposal); None when one is off."""
    if not space.levels:
        return None
    keeps: dict[str, int] = {}
    for s in space.slots:
        k = float(fractions[s.name]) * s.n
        near = min(s.levels, key=lambda v: abs(v - k))
        if abs(near - k) > 1e-6:
            return None
        keeps[s.name] = near
    return keeps


def nearest_levels(fractions: Fractions, space: SearchSpace) -> dict[str, int]:
    """Each slot's level nearest its fraction (a sampler without a budget: NSGA-II's genome)."""
    return {
        s.name: min(s.levels or s.allowed, key=lambda v: (abs(v - float(fractions[s.name]) * s.n), v))
        for s in space.slots
    }


def _on_levels(fractions: Fractions, space: SearchSpace) -> dict[str, int] | None:
    """The level counts the fractions sit on exactly (a level sampler's proposal) when they meet the
    goal to within one level step; None otherwise."""
    keeps = level_keeps(fractions, space)
    if keeps is None:
        return None
    if abs(space.goal - space.removal(keeps)) > space.level_step_params:
        return None
    return keeps


def project_to_budget(fractions: Fractions, space: SearchSpace) -> Plan:
    """Sampled keep fractions -> a feasible plan removing the budget to within one rounding step.

    The removal shares (1 - fraction) are scaled by one common factor (their ratios are what
    the sampler chooses), clipped to each slot's limits, rounded to the nearest level (every
    allowed count without levels), then slots are moved one level at a time, the one farthest
    from its continuous target first, until the removal is within half a level of the goal, and
    then by single rounding steps until it is within half a step. Fractions that already sit on
    levels meeting the goal to within one level (a level sampler's candidate) skip the scaling.
    """
    slots = space.slots
    missing = [s.name for s in slots if s.name not in fractions]
    if missing:
        raise KeyError(f"fractions lack {', '.join(missing)}")
    goal = space.goal
    most = sum((s.n - s.allowed[0]) * s.unit_params for s in slots)
    least = sum((s.n - s.allowed[-1]) * s.unit_params for s in slots)
    tol = space.step_params / 2
    if goal > most + tol:
        raise BudgetError(
            f"budget.params: removing {goal:,} parameters is infeasible; under budget.min_keep="
            f"{space.spec.min_keep} the searched structures can lose at most {most:,}"
        )
    if goal < least - tol:
        raise BudgetError(
            f"budget.params: budget.max_keep={space.spec.max_keep} already removes {least:,} parameters, "
            f"more than the budget of {goal:,}"
        )
    keeps = _on_levels(fractions, space)
    if keeps is not None:
        target = {s.name: float(keeps[s.name]) for s in slots}
    else:
        weights = [min(max(1.0 - float(fractions[s.name]), 0.0), 1.0) for s in slots]
        if not any(w > 0 for w in weights):
            weights = [1.0] * len(slots)  # nothing asked anywhere: spread evenly
        alpha = _bisect_alpha(slots, weights, goal)
        target, keeps = {}, {}
        for s, w in zip(slots, weights):
            r = min(max(alpha * w, 1 - s.allowed[-1] / s.n), 1 - s.allowed[0] / s.n)
            target[s.name] = s.n * (1 - r)
            keeps[s.name] = min(s.grid, key=lambda k, t=target[s.name]: (abs(k - t), k))
        if space.levels:
            _greedy(keeps, target, slots, {s.name: s.grid for s in slots}, goal, space.level_step_params / 2)
    removed = _greedy(keeps, target, slots, {s.name: s.allowed for s in slots}, goal, tol)
    if abs(goal - removed) > space.step_params:
        raise BudgetError(
            f"budget.params: could not meet {goal:,} removed parameters within one rounding step "
            f"(got {removed:,}); loosen budget.min_keep/max_keep or multiple_of"
        )
    return space.to_plan(keeps)


def snap_to_levels(keeps: dict[str, int], space: SearchSpace) -> dict[str, int]:
    """Kept counts -> the nearest levels, moved level by level until the removal is within half a
    level step of the goal: the genome a level sampler mutates."""
    out = {s.name: min(s.levels, key=lambda v: (abs(v - keeps[s.name]), v)) for s in space.slots}
    target = {s.name: float(keeps[s.name]) for s in space.slots}
    _greedy(
        out,
        target,
        space.slots,
        {s.name: s.levels for s in space.slots},
        space.goal,
        space.level_step_params / 2,
    )
    return out


def level_switch(
    keeps: dict[str, int], space: SearchSpace, rng: random.Random, tries: int = 64
) -> dict[str, int]:
    """EvoPress's mutation: one slot down a level and another of the same kind up a level, chosen so
    the parameters they move are equal, so the removal (the budget) does not change at all.
    Returns the input unchanged when no such pair exists."""
    by_name = {s.name: s for s in space.slots}
    names = list(by_name)
    for _ in range(tries):
        a, b = rng.sample(names, 2)
        sa, sb = by_name[a], by_name[b]
        ia, ib = sa.levels.index(keeps[a]), sb.levels.index(keeps[b])
        if ia == 0 or ib == len(sb.levels) - 1:
            continue
        down = (sa.levels[ia] - sa.levels[ia - 1]) * sa.unit_params
        up = (sb.levels[ib + 1] - sb.levels[ib]) * sb.unit_params
        if down != up:
            continue
        out = dict(keeps)
        out[a], out[b] = sa.levels[ia - 1], sb.levels[ib + 1]
        return out
    return dict(keeps)


def free_move(keeps: dict[str, int], space: SearchSpace, rng: random.Random) -> dict[str, int]:
    """A move that may change the removal: one slot down a level and another, of any kind, up one
    (MLP width for attention, a whole branch for widths elsewhere), or a single slot up or down a level.
    A speed-budgeted search keeps the moves whose predicted time meets its goal."""
    by_name = {s.name: s for s in space.slots}
    out = dict(keeps)
    a, b = rng.sample(list(by_name), 2)
    kind = rng.random()
    for name, step in ((a, -1), (b, +1)) if kind < 0.6 else (((a, +1),) if kind < 0.8 else ((a, -1),)):
        levels = by_name[name].levels
        j = levels.index(out[name]) + step
        if 0 <= j < len(levels):
            out[name] = levels[j]
    return out


def uniform_fractions(space: SearchSpace) -> Fractions:
    """Equal fractions everywhere: projects to the uniform allocation (the baseline to beat)."""
    keep = 1.0 - space.goal / max(space.prunable_params, 1)
    return space.clip({name: keep for name in space.names})


def angular_fractions(space: SearchSpace, importance: dict[int, float], spread: float = 0.1) -> Fractions:
    """CFSP-style allocation: blocks that change the hidden state more keep more.

    `importance[i]` is block i's angular distance arccos(cos(h_in, h_out)) / pi on calibration
    tokens. Importances are min-max normalised and mapped linearly to removal shares around the
    uniform one, +-`spread` (OWL-like bounded deviation), so the projection keeps the ordering
    without emptying any block.
    """
    base = 1.0 - space.goal / max(space.prunable_params, 1)
    vals = [importance[s.layer] for s in space.slots]
    lo, hi = min(vals), max(vals)
    out: Fractions = {}
    for s in space.slots:
        z = 0.5 if hi - lo < 1e-12 else (importance[s.layer] - lo) / (hi - lo)
        out[s.name] = base + spread * (2 * z - 1)
    return space.clip(out)
