"""The latency model: whole-model prefill and decode time predicted from per-layer times measured
in the serving target's engine.

A model's time is a fixed part (embeddings, final norm, LM head, the engine's own overhead) plus
one term per decoder layer. Both come from probes (runtime/speed/probe.py) of the dense shapes:
the fixed part and the dense layer from depths 1 and 1 + DEPTH, other MLP widths from probes of
depth 1 + DEPTH at a grid of widths aligned to the recipe's `multiple_of` (the widths the plan may
take, all on the engine's fast path), interpolated linearly between grid points. Attention shapes
(kept query heads and KV groups) get a grid of their own when a plan uses them. A removed MLP
branch costs the layer's line extrapolated to width 0; a removed attention branch removes that
intercept. Every timing is cached (runtime/speed/cache.py), so predicting a plan measures nothing
twice.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from secateur.graph.plan import Plan
from secateur.runtime.speed.measure import Target, time_shapes
from secateur.runtime.speed.probe import ProbeShape

DEPTH = 4
GRID_POINTS = 5
PHASES = ("prefill", "decode")


def width_grid(n_ff: int, multiple_of: int, min_keep: float, points: int = GRID_POINTS) -> list[int]:
    """`points` widths, aligned to `multiple_of`, from the narrowest allowed to the dense width."""
    lo = max(multiple_of, int(min_keep * n_ff) // multiple_of * multiple_of)
    out = {n_ff}
    for k in range(points - 1):
        w = lo + (n_ff - lo) * k / (points - 1)
        out.add(max(multiple_of, int(round(w / multiple_of)) * multiple_of))
    return sorted(out)


@dataclass
class LatencyModel:
    """Per-layer times of one dense model's shapes on one target; `predict` sums them."""

    target: Target
    dense: ProbeShape
    grid: list[int]
    progress: Callable[[str], None] | None = None
    rounds: int | None = None
    fixed: dict[str, float] = field(default_factory=dict)
    layer: dict[tuple[int, int], dict[int, dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        target: Target,
        dense: ProbeShape,
        multiple_of: int,
        min_keep: float = 0.05,
        progress: Any = None,
        rounds: int | None = None,
    ) -> LatencyModel:
        """Measure (or read from the cache) the fixed part and the dense attention's width grid."""
        grid = width_grid(dense.n_ff, multiple_of, min_keep)
        m = cls(target, dense.with_(n_layers=1), grid, progress, rounds)
        one, deep = m.dense, m.dense.with_(n_layers=1 + DEPTH)
        t = time_shapes(target, [one, deep], rounds, progress)
        for p in PHASES:
            per_layer = (t[deep].phase(p) - t[one].phase(p)) / DEPTH
            m.fixed[p] = t[one].phase(p) - per_layer
        m._attention(dense.n_head, dense.n_kv)
        return m

    def _attention(self, n_head: int, n_kv: int) -> dict[int, dict[str, float]]:
        """Per-layer time at every grid width for one attention shape (measured once)."""
        key = (n_head, n_kv)
        if key not in self.layer:
            shapes = {
                w: self.dense.with_(n_layers=1 + DEPTH, n_ff=w, n_head=n_head, n_kv=n_kv) for w in self.grid
            }
            t = time_shapes(self.target, list(shapes.values()), self.rounds, self.progress)
            self.layer[key] = {
                w: {p: (t[s].phase(p) - self.fixed[p]) / (1 + DEPTH) for p in PHASES}
                for w, s in shapes.items()
            }
        return self.layer[key]

    def layer_time(self, n_head: int, n_kv: int, n_ff: int, phase: str) -> float:
        """One layer's time: linear between grid widths (and extrapolated beyond them)."""
        row = self._attention(n_head, n_kv)
        ws = self.grid
        j = min(max(bisect.bisect_left(ws, n_ff), 1), len(ws) - 1)
        a, b = ws[j - 1], ws[j]
        ta, tb = row[a][phase], row[b][phase]
        return ta + (tb - ta) * (n_ff - a) / (b - a)

    def shape_time(self, s: Mapping[str, Any], phase: str) -> float:
        """A layer from `graph.groups.layer_shapes`: removed branches as described above."""
        if s.get("skip_attention") and s.get("skip_mlp"):
            return 0.0
        n_head, n_kv = (
            (self.dense.n_head, self.dense.n_kv)
            if s.get("skip_attention")
            else (
                int(s["num_heads"]),
                int(s["num_kv_heads"]),
            )
        )
        intercept = self.layer_time(n_head, n_kv, 0, phase)
        if s.get("skip_mlp"):
            return max(intercept, 0.0)
        full = self.layer_time(n_head, n_kv, int(s["intermediate_size"]), phase)
        return max(full - intercept, 0.0) if s.get("skip_attention") else full

    def predict(self, shapes: list[Mapping[str, Any]]) -> dict[str, float]:
        """Seconds per prefill of `target.prefill_len` tokens and per `target.decode_tokens` steps."""
        return {p: self.fixed[p] + sum(self.shape_time(s, p) for s in shapes) for p in PHASES}

    def dense_shapes(self, n_layers: int) -> list[dict[str, Any]]:
        """The dense model's layer shapes, as `graph.groups.layer_shapes` gives them."""
        d = self.dense
        one = {"num_heads": d.n_head, "num_kv_heads": d.n_kv, "intermediate_size": d.n_ff}
        return [dict(one) for _ in range(n_layers)]

    def plan_ratios(self, plan: Plan, n_layers: int) -> dict[str, float]:
        """Predicted time of a plan per phase as a fraction of the dense model's."""
        dense = self.predict(self.dense_shapes(n_layers))
        pred = self.predict(plan_shapes(self.dense, plan, n_layers))
        return {p: pred[p] / dense[p] for p in PHASES}


def plan_shapes(dense: ProbeShape, plan: Plan, n_layers: int) -> list[dict[str, Any]]:
    """Per-layer shapes a plan gives (kept counts only; which units are kept does not change speed)."""
    out = []
    group = dense.n_head // max(dense.n_kv, 1)
    for i in range(n_layers):
        lp = plan.layers.get(i)
        kv = lp.kv_groups if lp and lp.kv_groups is not None else dense.n_kv
        q = lp.q_per_group if lp and lp.q_per_group is not None else group
        ff = lp.mlp if lp and lp.mlp is not None else dense.n_ff
        out.append(
            {
                "num_heads": kv * q,
                "num_kv_heads": kv,
                "intermediate_size": ff,
                "skip_attention": bool(lp and lp.drop_attn),
                "skip_mlp": bool(lp and lp.drop_mlp),
            }
        )
    return out
