"""One trial: project, prune the live model from cached statistics, score the proxy, undo.

Pruning a trial uses the DENSE model's statistics for every layer (one-shot), not the
sequential statistics of the already pruned layers below it: that is what makes a trial cost
a few restorations and one evaluation instead of a full calibration pass. The winning plan is
compiled afterwards by `runtime.sequential.prune_sequential` on a fresh model.

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
from secateur.recipe.space import SearchSpace, project_to_budget
from secateur.runtime.proxy import ProxyKind, batch_terms, proxy_value
from secateur.runtime.select import by_score, select_units
from secateur.runtime.sequential import write_consumers
from secateur.runtime.snapshot import ModuleSnapshot
from secateur.runtime.surgery import apply_keep
from secateur.search.cache import SearchCache
from secateur.search.space import suggest


def owner_tag() -> str:
    """host:pid of this process, recorded on each trial so a crashed run's trials can be failed."""
    return f"{socket.gethostname()}:{os.getpid()}"


def select_from_scores(cache: SearchCache, i: int, lp: LayerPlan) -> LayerKeep:
    """Kept units of layer i from the cached dense scores (the rule of `runtime.select.select_units`)."""
    lc = cache.layers[i]
    return select_units(lp, lc.n_units, by_score(lambda kind: lc.scores[kind]))


@contextmanager
def pruned(model: nn.Module, adapter: ModelAdapter, cache: SearchCache, plan: Plan) -> Iterator[nn.Module]:
    """The model pruned to `plan` with restored consumers, inside the block; dense again after it."""
    if plan.metric != cache.metric:
        raise ValueError(f"plan metric {plan.metric!r} differs from the cached scores' {cache.metric!r}")
    blocks = adapter.layers(model)
    todo = [(i, lp) for i, lp in sorted(plan.layers.items()) if not lp.is_noop()]
    snap = ModuleSnapshot([blocks[i] for i, _ in todo])
    try:
        for i, lp in todo:
            lk = select_from_scores(cache, i, lp)
            weights: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
            if lk.mlp is not None and not lk.drop_mlp:
                part = LayerKeep(mlp=lk.mlp)
                weights.update(
                    cache.restored(model, adapter, i, ("mlp", lp.mlp), part, plan.damping, plan.restore)
                )
            if not lk.drop_attn and (lk.kv_heads is not None or lk.q_heads is not None):
                part = LayerKeep(kv_heads=lk.kv_heads, q_heads=lk.q_heads)
                key = ("attn", lp.kv_groups, lp.q_per_group)
                weights.update(cache.restored(model, adapter, i, key, part, plan.damping, plan.restore))
            apply_keep(model, adapter, {i: lk})
            with torch.no_grad():
                write_consumers(model, weights)  # sliced tensors are fresh, never the dense ones
        yield model
    finally:
        snap.restore()


@torch.inference_mode()
def proxy_sum(
    model: nn.Module, cache: SearchCache, start: int, stop: int, kind: ProxyKind, batch_size: int
) -> tuple[float, int]:
    """(sum of per-token terms, token count) over held-out windows [start, stop)."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for s in range(start, stop, batch_size):
        e = min(s + batch_size, stop)
        ids = cache.heldout[s:e].to(dev)
        logits = model(ids, use_cache=False).logits
        total += batch_terms(logits, ids, cache.reference, slice(s, e), kind)
        count += ids.shape[0] * (ids.shape[1] - 1)
    return total, count


def evaluate_plan(
    model: nn.Module,
    adapter: ModelAdapter,
    cache: SearchCache,
    plan: Plan,
    kind: ProxyKind = "kl",
    trial: optuna.Trial | None = None,
    first_windows: int | None = None,
    batch_size: int = 4,
) -> float:
    """Proxy value of `plan` (mean KL to the dense model, or perplexity) on the held-out windows.

    With a trial, the first `first_windows` are scored first and reported, and the trial is
    pruned there when the pruner says so (multi-fidelity); the rest are scored only after.
    """
    n = cache.heldout.shape[0]
    first = n if trial is None or first_windows is None else max(1, min(first_windows, n))
    with pruned(model, adapter, cache, plan) as m:
        total, count = proxy_sum(m, cache, 0, first, kind, batch_size)
        if first < n:
            trial.report(proxy_value(total, count, kind), first)
            if trial.should_prune():
                raise optuna.TrialPruned()
            t2, c2 = proxy_sum(m, cache, first, n, kind, batch_size)
            total, count = total + t2, count + c2
    value = proxy_value(total, count, kind)
    if trial is not None:
        trial.report(value, n)
    return value


class Objective:
    """The Optuna objective: suggest fractions, project onto the budget, evaluate the proxy."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        cache: SearchCache,
        space: SearchSpace,
        kind: ProxyKind = "kl",
        first_windows: int | None = None,
        batch_size: int = 4,
        fixed: dict[str, Plan] | None = None,
    ) -> None:
        self.model, self.adapter, self.cache, self.space = model, adapter, cache, space
        self.kind, self.first_windows, self.batch_size = kind, first_windows, batch_size
        self.fixed = dict(fixed or {})  # seed tag -> exact plan (e.g. the compiler's uniform plan)

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("owner", owner_tag())
        fractions = suggest(self.space, trial)
        init = trial.user_attrs.get("init")
        plan = self.fixed[init] if init in self.fixed else project_to_budget(fractions, self.space)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("removed", self.space.removal(self.space.keeps_of(plan)))
        # seeded trials (uniform, angular) are always evaluated in full: they are the floor to beat
        first = None if init is not None else self.first_windows
        return evaluate_plan(
            self.model, self.adapter, self.cache, plan, self.kind, trial, first, self.batch_size
        )
