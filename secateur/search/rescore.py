"""Choose on the built model: the best candidates compiled the way the recipe compiles, re-scored.

A search scores candidates stitched from one-shot variants (each structure pruned and restored from
the DENSE model's statistics), while a recipe with `allocation.compile: sequential` builds the model
layer by layer on the pruned model's own statistics: the two differ by about 1% in held-out KL, and
not by the same amount for every allocation. So before a winner is named, the `k` best complete
trials (distinct plans) and the seeds (uniform, CFSP) are compiled by the caller's `compile_fn`
(the recipe's own compile) and scored on every held-out window with the same proxy; the winner is
the best compiled model. Each value is stored on the study (user attribute `rescored_<trial>`), so
a resumed search does not compile a candidate twice; the winner's compiled model is kept in memory
for the caller (what `--compile` would write, logit for logit).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from secateur.graph.plan import Plan
from secateur.runtime.allocation.proxy import ProxyKind, proxy_value
from secateur.search.cache import SearchCache
from secateur.search.objective import proxy_sum

CompileFn = Callable[[nn.Module, Plan], None]  # prunes the given model (a dense copy) in place


@dataclass
class Rescored:
    """Re-scored candidates (best first) and the winner's compiled model (None when every value was
    read back from the study and nothing was compiled in this process)."""

    rows: list[dict[str, Any]]
    model: nn.Module | None


def candidates(study: optuna.Study, k: int) -> list[FrozenTrial]:
    """The `k` best complete trials with distinct plans, plus every seed (uniform, cfsp)."""
    done = sorted(
        (
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "plan" in t.user_attrs and t.user_attrs.get("feasible", True)
        ),
        key=lambda t: (t.value, t.number),
    )
    out: list[FrozenTrial] = []
    seen: set[str] = set()
    for t in done:
        key = repr(t.user_attrs["plan"])
        if key in seen:
            continue
        if len([x for x in out if not x.user_attrs.get("init")]) < k or t.user_attrs.get("init"):
            out.append(t)
            seen.add(key)
    return out


def compiled_value(model: nn.Module, cache: SearchCache, kind: ProxyKind, batch_size: int) -> float:
    """The proxy on every held-out window of an already compiled model (no stitching, no stages)."""
    total, count = proxy_sum(model, cache, 0, cache.heldout.shape[0], kind, batch_size)
    return proxy_value(total, count, kind)


def rescore(
    study: optuna.Study,
    model: nn.Module,
    cache: SearchCache,
    compile_fn: CompileFn,
    k: int,
    kind: ProxyKind = "kl",
    batch_size: int = 4,
    emit: Callable[[str], None] | None = None,
) -> Rescored:
    """Compile each candidate from a copy of the dense `model`, score it, keep the best compiled model."""
    rows: list[dict[str, Any]] = []
    best_model: nn.Module | None = None
    best_value = float("inf")
    stored = study.user_attrs
    for t in candidates(study, k):
        key = f"rescored_{t.number}"
        t0 = time.perf_counter()
        if key in stored:
            value = float(stored[key])
            built = False
        else:
            m = copy.deepcopy(model)
            compile_fn(m, Plan.from_dict(t.user_attrs["plan"]))
            value = compiled_value(m, cache, kind, batch_size)
            study.set_user_attr(key, value)
            built = True
            if value < best_value:
                best_model, best_value = m, value
            else:
                del m
        rows.append(
            {
                "trial": t.number,
                "init": t.user_attrs.get("init"),
                "search_value": float(t.value),
                "value": value,
                "plan": t.user_attrs["plan"],
                "seconds": time.perf_counter() - t0 if built else None,
            }
        )
        if emit is not None:
            tag = f" [{t.user_attrs['init']}]" if t.user_attrs.get("init") else ""
            emit(
                f"rescore: trial {t.number}{tag} compiled: {kind}={value:.6g} (stitched {t.value:.6g})"
                + (f"  {rows[-1]['seconds']:.0f} s" if built else "  (stored)")
            )
    rows.sort(key=lambda r: (r["value"], r["trial"]))
    if best_model is not None and best_value > rows[0]["value"]:
        best_model = None  # the winner's value was read back: its model was not built here
    return Rescored(rows, best_model)
