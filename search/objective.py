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

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import optuna
import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.runtime.plan import LayerPlan, Plan
from secateur.runtime.select import top_units
from secateur.runtime.sequential import write_consumers
from secateur.runtime.surgery import LayerKeep, apply_keep
from secateur.search.cache import Reference, SearchCache
from secateur.search.space import SearchSpace, project_to_budget

ProxyKind = Literal["kl", "ppl"]


def owner_tag() -> str:
    """host:pid of this process, recorded on each trial so a crashed run's trials can be failed."""
    return f"{socket.gethostname()}:{os.getpid()}"


def select_from_scores(cache: SearchCache, i: int, lp: LayerPlan) -> LayerKeep:
    """Kept units of layer i from the cached dense scores (same rule as sequential.select_layer)."""
    lc = cache.layers[i]
    lk = LayerKeep(drop_attn=lp.drop_attn, drop_mlp=lp.drop_mlp)
    n_mlp = lc.n_units.get("mlp_channel", 0)
    if lp.mlp is not None and not lp.drop_mlp and lp.mlp < n_mlp:
        lk.mlp = top_units(lc.scores["mlp_channel"], lp.mlp)
    if lp.drop_attn or "kv_group" not in lc.n_units:
        return lk
    n_kv, n_q = lc.n_units["kv_group"], lc.n_units["q_head"]
    if lp.kv_groups is not None and lp.kv_groups < n_kv:
        lk.kv_heads = top_units(lc.scores["kv_group"], lp.kv_groups)
    r = n_q // n_kv
    if lp.q_per_group is not None and lp.q_per_group < r:
        kept_kv = set(lk.kv_heads if lk.kv_heads is not None else range(n_kv))
        chosen = top_units(lc.scores["q_head"], lp.q_per_group, partitions=n_kv)
        lk.q_heads = [h for h in chosen if h // r in kept_kv]
    return lk


class _Snapshot:
    """The module dictionaries of some layers, to put back after a trial (no tensor copies)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.saved = [
            (m, dict(m.__dict__), dict(m._parameters), dict(m._modules), dict(m._buffers))
            for layer in layers
            for m in layer.modules()
        ]

    def restore(self) -> None:
        for m, d, params, mods, bufs in self.saved:
            m.__dict__.clear()
            m.__dict__.update(d)
            m.__dict__["_parameters"] = dict(params)
            m.__dict__["_modules"] = dict(mods)
            m.__dict__["_buffers"] = dict(bufs)


@contextmanager
def pruned(model: nn.Module, adapter: ModelAdapter, cache: SearchCache, plan: Plan) -> Iterator[nn.Module]:
    """The model pruned to `plan` with restored consumers, inside the block; dense again after it."""
    if plan.metric != cache.metric:
        raise ValueError(f"plan metric {plan.metric!r} differs from the cached scores' {cache.metric!r}")
    blocks = adapter.layers(model)
    todo = [(i, lp) for i, lp in sorted(plan.layers.items()) if not lp.is_noop()]
    snap = _Snapshot([blocks[i] for i, _ in todo])
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


def _batch_terms(
    logits: torch.Tensor, ids: torch.Tensor, ref: Reference, rows: slice, kind: ProxyKind
) -> float:
    """Sum over the batch's scored tokens of KL(dense || pruned) or of the NLL."""
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if kind == "ppl":
        return float(F.nll_loss(logq.reshape(-1, logq.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
    logp = ref.logp[rows].to(logq.device)
    if ref.full:
        return float((logp.exp() * (logp - logq)).sum())
    idx = ref.index[rows].to(logq.device).long()
    q_top = logq.gather(-1, idx)
    head = (logp.exp() * (logp - q_top)).sum()
    rest_p = ref.log_rest[rows].to(logq.device)
    rest_q = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-7))
    return float(head + (rest_p.exp() * (rest_p - rest_q)).sum())


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
        total += _batch_terms(logits, ids, cache.reference, slice(s, e), kind)
        count += ids.shape[0] * (ids.shape[1] - 1)
    return total, count


def _value(total: float, count: int, kind: ProxyKind) -> float:
    v = total / max(count, 1)
    v = math.exp(min(v, 700.0)) if kind == "ppl" else v
    return v if math.isfinite(v) else float("inf")


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
            trial.report(_value(total, count, kind), first)
            if trial.should_prune():
                raise optuna.TrialPruned()
            t2, c2 = proxy_sum(m, cache, first, n, kind, batch_size)
            total, count = total + t2, count + c2
    value = _value(total, count, kind)
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
        fractions = self.space.suggest(trial)
        init = trial.user_attrs.get("init")
        plan = self.fixed[init] if init in self.fixed else project_to_budget(fractions, self.space)
        trial.set_user_attr("plan", plan.to_dict())
        trial.set_user_attr("removed", self.space.removal(self.space.keeps_of(plan)))
        # seeded trials (uniform, angular) are always evaluated in full: they are the floor to beat
        first = None if init is not None else self.first_windows
        return evaluate_plan(
            self.model, self.adapter, self.cache, plan, self.kind, trial, first, self.batch_size
        )
