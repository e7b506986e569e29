"""Resolving a recipe against its serving target before anything is compiled.

`budget.multiple_of: auto` becomes the width step the target engine runs fast (runtime/speed/width.py)
and a `budget.latency` / `budget.throughput` goal becomes the parameter count whose uniform plan
the latency model (runtime/speed/latency.py) predicts to meet it, the way a FLOPs goal becomes a
count. The resolved recipe is what every later step, and the lock, sees; `SpeedResolution` keeps
the goal and the evidence for `recipe explain` and the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import decoder_linear_params
from secateur.recipe.compile import (
    BudgetError,
    BudgetSpec,
    eligible_layers,
    feasible_fraction,
    uniform_plan,
)
from secateur.recipe.load import recipe_from_dict, resolved_dict
from secateur.recipe.schema import Recipe
from secateur.runtime.speed.engines import default_threads
from secateur.runtime.speed.latency import PHASES, LatencyModel
from secateur.runtime.speed.latency import plan_shapes as layer_shapes_of_plan
from secateur.runtime.speed.measure import Target
from secateur.runtime.speed.probe import ProbeShape, shape_of_config
from secateur.runtime.speed.width import Sweep, auto_multiple_of

_LLAMA_TYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class SpeedResolution:
    """What resolution decided: the target, the width step and, for a speed goal, its prediction."""

    target: Target
    sweep: Sweep | None = None
    goal: float | None = None  # fraction of dense time
    phase: str = "both"
    count: int | None = None
    predicted: dict[str, float] = field(default_factory=dict)  # phase -> predicted time / dense time
    latency: LatencyModel | None = None  # built for a speed goal; `recipe explain` reuses it

    def lines(self) -> list[str]:
        """Human-readable lines for progress, explain and the report."""
        out = [f"serving target: {self.target.describe()}"]
        if self.sweep is not None:
            out.append(f"width step: {self.sweep.describe()}")
        if self.goal is not None:
            pred = ", ".join(f"{p} {v:.3f}" for p, v in self.predicted.items())
            out.append(
                f"latency goal {self.goal:.3f} of dense ({self.phase}): removes {self.count:,} parameters "
                f"(uniform plan predicted at {pred} of dense time)"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target": self.target.describe()}
        if self.sweep is not None:
            d["multiple_of"] = self.sweep.multiple_of
            d["width_step"] = self.sweep.describe()
        if self.goal is not None:
            d.update(goal=self.goal, phase=self.phase, params=self.count, predicted=self.predicted)
        return d


def target_of(recipe: Recipe) -> Target:
    """The recipe's `target` section with its defaults filled in for this machine."""
    t = recipe.target
    dtype = t.dtype
    if dtype == "auto":
        dtype = "f16" if t.engine == "llama.cpp" else ("bfloat16" if t.device == "cuda" else "float32")
    elif t.engine == "llama.cpp":
        dtype = _LLAMA_TYPES[dtype]
    lat = recipe.evaluate.latency
    return Target(
        t.engine, t.device, dtype, t.quant, t.threads or default_threads(), lat.prefill_len, lat.decode_tokens
    )


def dense_probe(adapter: ModelAdapter) -> ProbeShape:
    return shape_of_config(adapter.config)


def latency_to_params(
    model: nn.Module, adapter: ModelAdapter, recipe: Recipe, lat: LatencyModel, goal: float, phase: str
) -> tuple[int, dict[str, float]]:
    """The smallest parameter count whose uniform plan is predicted to take at most `goal` of dense
    time in `phase` (each phase for `both`), by bisection over the count."""
    b, t = recipe.budget, recipe.targets
    layers = eligible_layers(t, adapter.num_layers, adapter.layers_path)
    phases = PHASES if phase == "both" else (phase,)
    dense_t = lat.predict(lat.dense_shapes(adapter.num_layers))

    def ratios(count: int) -> dict[str, float] | None:
        spec = BudgetSpec(None, count, t.mlp, t.attention, b.min_keep, b.max_keep, int(b.multiple_of))
        try:
            plan = uniform_plan(model, adapter, spec, layers)
        except BudgetError:
            return None
        pred = lat.predict(layer_shapes_of_plan(lat.dense, plan, adapter.num_layers))
        return {p: pred[p] / dense_t[p] for p in phases}

    spec = BudgetSpec(0.5, None, t.mlp, t.attention, b.min_keep, b.max_keep, int(b.multiple_of))
    hi = int(feasible_fraction(model, adapter, spec, layers) * decoder_linear_params(model, adapter))
    best = ratios(hi)
    if best is None or max(best.values()) > goal:
        got = ", ".join(f"{p} {v:.3f}" for p, v in (best or {}).items())
        raise BudgetError(
            f"budget.latency: {goal:.3f} of dense time is out of reach on {lat.target.describe()}: removing "
            f"everything budget.min_keep allows from the targeted structures is predicted at {got}; "
            "target more structures (attention, sublayers) or relax the goal"
        )
    lo = 0
    while hi - lo > max(1, hi // 2000):
        mid = (lo + hi) // 2
        r = ratios(mid)
        if r is not None and max(r.values()) <= goal:
            hi, best = mid, r
        else:
            lo = mid
    return hi, best


def resolve_speed(
    recipe: Recipe,
    model: nn.Module,
    adapter: ModelAdapter,
    log: Callable[[str], None] | None = None,
    target: Target | None = None,
) -> tuple[Recipe, SpeedResolution]:
    """The recipe with `multiple_of: auto` and a speed goal resolved against `model`'s shapes (a
    weightless skeleton will do); unchanged when it has neither (`target` replaces the recipe's own,
    e.g. to time with fewer rounds)."""
    target = target or target_of(recipe)
    res = SpeedResolution(target)
    b = recipe.budget
    if b.multiple_of != "auto" and b.latency_goal is None:
        return recipe, res
    dense = dense_probe(adapter)
    data = resolved_dict(recipe)
    if b.multiple_of == "auto":
        res.sweep = auto_multiple_of(target, dense, log)
        data["budget"]["multiple_of"] = res.sweep.multiple_of
        if log:
            log(f"budget.multiple_of auto: {res.sweep.describe()} on {target.describe()}")
    resolved = recipe_from_dict(data, "<recipe with multiple_of resolved>")
    if b.latency_goal is None:
        return resolved, res
    if recipe.passes:
        raise BudgetError(
            "budget.latency/throughput: compiled for single-stage recipes only (no passes:) so far"
        )
    res.latency = LatencyModel.build(target, dense, int(resolved.budget.multiple_of), b.min_keep, log)
    res.goal, res.phase = b.latency_goal, b.phase
    res.count, res.predicted = latency_to_params(
        model, adapter, resolved, res.latency, b.latency_goal, b.phase
    )
    data["budget"].update(params=res.count, latency=None, throughput=None, phase="both")
    return recipe_from_dict(data, "<recipe with its latency goal resolved>"), res
