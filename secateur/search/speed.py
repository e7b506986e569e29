"""A speed budget for the search: the serving target's latency model as the constraint.

`budget.latency` / `budget.throughput` resolve (secateur/speed_target.py) to a parameter count whose
uniform plan the latency model predicts to meet the goal; that count seeds the search (uniform and
CFSP at it). The search itself is then held to the goal, not to the count: a candidate is feasible
when its predicted time (each phase the goal names) is at most the goal, whatever it removes, so the
evolution may trade MLP width for attention or whole sublayers wherever that is faster per unit of
quality (runtime/speed/latency.py prices every width, head count and removed branch on the target).
"""

from __future__ import annotations

from dataclasses import dataclass

from secateur.graph.plan import Plan
from secateur.runtime.speed.latency import PHASES, LatencyModel

TOLERANCE = 1e-9


@dataclass
class SpeedBudget:
    """Predicted time / dense time of a plan on one target, and the goal it must meet."""

    latency: LatencyModel
    goal: float  # fraction of dense time
    phase: str  # prefill, decode or both
    n_layers: int

    @property
    def phases(self) -> tuple[str, ...]:
        return PHASES if self.phase == "both" else (self.phase,)

    def ratios(self, plan: Plan) -> dict[str, float]:
        """Predicted time of `plan` per phase, as a fraction of dense."""
        return self.latency.plan_ratios(plan, self.n_layers)

    def worst(self, plan: Plan) -> float:
        """The largest ratio over the phases the goal names (what must be <= goal)."""
        r = self.ratios(plan)
        return max(r[p] for p in self.phases)

    def meets(self, plan: Plan) -> bool:
        return self.worst(plan) <= self.goal + TOLERANCE

    def fingerprint(self) -> list:
        """What a study records so one searched for another goal or target is refused."""
        return [round(self.goal, 6), self.phase, self.latency.target.describe()]
