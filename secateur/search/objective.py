"""One trial: project, prune the live model from cached statistics, score the proxy, undo.

A trial stitches stored variants (`runtime.allocation.variants`: each structure of each layer pruned and
restored one-shot from the DENSE model's statistics) into the dense model: no pruning per trial,
only an evaluation. With `allocation.compile: stitched` the winner compiles from the very same
variants, so the compiled model is exactly the evaluated candidate.

Undo is exact and copies no weights: surgery only ever replaces parameters and modules (it
slices into new tensors), so snapshotting each touched layer's module dictionaries before
the trial and putting them back afterwards returns the very same dense tensors.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import LayerPlan, Plan
from secateur.runtime.allocation.proxy import ProxyKind, batch_terms, proxy_value
from secateur.runtime.allocation.space import (
    Fractions,
    SearchSpace,
    level_keeps,
    nearest_levels,
    project_to_budget,
)
from secateur.runtime.allocation.variants import stitch
from secateur.runtime.prune.select import by_score, select_units
from secateur.runtime.prune.snapshot import ModuleSnapshot
from secateur.search.cache import SearchCache
from secateur.search.pareto import Cost
from secateur.search.prefix import PrefixCache
from secateur.search.speed import TOLERANCE, SpeedBudget


def owner_tag() -> str:
    """host:pid of this process, recorded on each trial so a crashed run's trials can be failed."""
    return f"{socket.gethostname()}:{os.getpid()}"


def select_from_scores(cache: SearchCache, i: int, lp: LayerPlan) -> LayerKeep:
    """Kept units of layer i from the cached dense scores (the rule of `runtime.prune.select.select_units`)."""
    lc = cache.layers[i]
    return select_units(lp, lc.n_units, by_score(lambda kind: lc.scores[kind]))


@contextmanager
def pruned(model: nn.Module, adapter: ModelAdapter, cache: SearchCache, plan: Plan) -> Iterator[nn.Module]:
    """The model with the plan's stored variants stitched in, inside the block; dense again after it."""
    if plan.metric != cache.metric:
        raise ValueError(f"plan metric {plan.metric!r} differs from the cached scores' {cache.metric!r}")
    if (plan.restore, float(plan.damping)) != (cache.restore, float(cache.damping)):
        raise ValueError(
            f"plan restoration {plan.restore!r} (damping {plan.damping}) differs from the variant "
            f"database's {cache.restore!r} (damping {cache.damping})"
        )
    variants = cache.source.variants_of(plan)  # built (if new) while the model is still dense
    snap = ModuleSnapshot([adapter.layers(model)[i] for i in variants])
    try:
        stitch(model, adapter, variants)
        yield model
    finally:
        snap.restore()


@torch.inference_mode()
def proxy_sum(
    model: nn.Module,
    cache: SearchCache,
    start: int,
    stop: int,
    kind: ProxyKind,
    batch_size: int,
    prefix: tuple[PrefixCache, int] | None = None,
) -> tuple[float, int]:
    """(sum of per-token terms, token count) over held-out windows [start, stop); with `prefix`
    (the cache and the plan's first changed layer) the layers below that one are not run."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        ids = cache.heldout[s:e].to(dev)
        if prefix is None:
            logits = model(ids, use_cache=False).logits
        else:
            logits = prefix[0].logits(model, ids, s, prefix[1])
        total += batch_terms(logits, ids, cache.reference, slice(s, e), kind)
        count += ids.shape[0] * (ids.shape[1] - 1)
    return total, count


def stage_bounds(n_windows: int, stages: list[int] | None) -> list[int]:
    """Cumulative window counts scored before each pruning decision, ending with all windows."""
    return sorted({max(1, min(int(b), n_windows)) for b in (stages or [])} | {n_windows})


def evaluate_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    cache: SearchCache,
    plan: Plan,
    kind: ProxyKind = "kl",
    trial: optuna.Trial | None = None,
    stages: list[int] | None = None,
    batch_size: int = 4,
    prunable: bool = True,
    prefix: PrefixCache | None = None,
) -> float:
    """Proxy value of `plan` (mean KL to the dense model, or perplexity) on the held-out windows.

    With a trial, the windows are scored in growing stages (`stages`: cumulative window counts):
    after each one the value so far is reported at step = tokens scored, and the trial is pruned
    there when the pruner says so (multi-fidelity), so only survivors are scored on more tokens;
    a trial that is not `prunable` (a seed) reports every stage and always goes on. With `prefix`
    the layers below the plan's first difference from the best fully scored plan are not run
    (search/prefix.py; the same value bit for bit).
    """
    n = cache.heldout.shape[0]
    bounds = stage_bounds(n, stages) if trial is not None else [n]
    total, count, start = 0.0, 0, 0
    at = (prefix, prefix.first_changed(plan)) if prefix is not None else None
    done = False
    try:
        with pruned(model, adapter, cache, plan) as m:
            for stop in bounds:
                t, c = proxy_sum(m, cache, start, stop, kind, batch_size, at)
                total, count, start = total + t, count + c, stop
                if trial is not None:
                    trial.report(proxy_value(total, count, kind), count)
                    if prunable and stop < n and trial.should_prune():
                        raise optuna.TrialPruned()
        done = True
    finally:
        if at is not None:
            if done:
                at[0].commit(plan, proxy_value(total, count, kind), at[1])
            else:
                at[0].discard()
    return proxy_value(total, count, kind)


def suggest(space: SearchSpace, trial: optuna.Trial) -> Fractions:
    """Sample the parameters in the space's range and expand them to one fraction per slot."""
    lo, hi = space.sample_range
    return space.expand({n: trial.suggest_float(n, lo, hi) for n in space.param_names})


class Objective:
    """The Optuna objective: suggest fractions, project onto the budget, evaluate the proxy."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        cache: SearchCache,
        space: SearchSpace,
        kind: ProxyKind = "kl",
        stages: list[int] | None = None,
        batch_size: int = 4,
        fixed: dict[str, Plan] | None = None,
        prefix: PrefixCache | None = None,
        speed: SpeedBudget | None = None,
        cost: Cost | None = None,
    ) -> None:
        self.model, self.adapter, self.cache, self.space = model, adapter, cache, space
        self.prefix = prefix
        self.kind, self.stages, self.batch_size = kind, list(stages or []), batch_size
        self.fixed = dict(fixed or {})  # seed tag -> exact plan (e.g. the compiler's uniform plan)
        self.speed = speed  # a latency goal: candidates are level plans held to it, not to a count
        self.cost = cost  # Pareto mode: the second objective (search/pareto.py)

    def plan_of(self, fractions: dict[str, float], init: str | None) -> Plan:
        """A seed's exact plan; a level plan as proposed under a speed goal; else the budget projection."""
        if init in self.fixed:
            return self.fixed[init]
        if (self.speed is not None or self.cost is not None) and self.space.levels:
            keeps = level_keeps(fractions, self.space) or nearest_levels(fractions, self.space)
            return self.space.to_plan(keeps)
        return project_to_budget(fractions, self.space)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        trial.set_user_attr("owner", owner_tag())
        fractions = suggest(self.space, trial)
        init = trial.user_attrs.get("init")
        parent_of = getattr(trial.study.sampler, "parent_of", None)  # the evolution's (paired comparison)
        parent = parent_of(trial.number) if parent_of is not None and init is None else None
        if parent is not None:
            trial.set_user_attr("parent", parent)
        plan = self.plan_of(fractions, init)
        trial.set_user_attr("plan", plan.to_dict())
        if self.cost is not None:  # Pareto mode: both values, every window (Optuna prunes one objective only)
            trial.set_user_attr("removed_fraction", self.cost.removed(plan))
            if self.cost.speed is not None:
                trial.set_user_attr("latency", self.cost.speed.worst(plan))
            value = evaluate_plan(
                self.model,
                self.adapter,
                self.cache,
                plan,
                self.kind,
                None,
                None,
                self.batch_size,
                False,
                self.prefix,
            )
            return value, self.cost(plan)
        if self.speed is not None:
            worst = self.speed.worst(plan)
            trial.set_user_attr("latency", worst)
            trial.set_user_attr("feasible", worst <= self.speed.goal + TOLERANCE)
        trial.set_user_attr("removed", self.space.removal(self.space.keeps_of(plan)))
        if self.prefix is not None:  # layers below it ran for an earlier candidate (search/prefix.py)
            trial.set_user_attr("from_layer", self.prefix.first_changed(plan))
        # seeded trials (uniform, angular) are always evaluated in full: they are the floor to beat
        return evaluate_plan(
            self.model,
            self.adapter,
            self.cache,
            plan,
            self.kind,
            trial,
            self.stages,
            self.batch_size,
            init is None,
            self.prefix,
        )
