"""A plan: how many units of each kind every layer keeps, and width rounding. The runtime executes plans.

Plans are what recipes compile to and what the search explores; which units are kept is
decided later by scores (or, in a lock, recorded explicitly).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerPlan:
    """Kept counts for one layer; None means the kind is not pruned in this layer.

    q_per_group: query heads kept in every KV group; kv_groups: KV groups kept;
    v_per_group: value channels kept in every KV group (FASP's v_channel unit).
    """

    mlp: int | None = None
    q_per_group: int | None = None
    kv_groups: int | None = None
    v_per_group: int | None = None
    drop_attn: bool = False
    drop_mlp: bool = False

    def is_noop(self) -> bool:
        return self == LayerPlan()


@dataclass(frozen=True)
class Scoring:
    """How units are scored, chosen and restored; its defaults are the recipe's and every plan's
    (the one place they are written)."""

    metric: str = "fasp"
    restore: str = "least_squares"
    damping: float = 0.01
    selection: str = "score"  # score: fixed per-unit scores; obs: greedy OBS on the consumer's Gram


@dataclass
class Plan:
    """Per-layer kept counts plus how units are scored and restored."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    metric: str = Scoring.metric
    restore: str = Scoring.restore
    damping: float = Scoring.damping
    selection: str = Scoring.selection
    error_correction: float = 0.0  # how far restoration aims at the dense model's outputs (0 off, 1 fully)
    refine_steps: int = 0  # optimizer steps on each pruned MLP branch toward the dense branch
    refine_lr: float = 1e-4

    @property
    def scoring(self) -> Scoring:
        """The plan's scoring options as one frozen object."""
        return Scoring(self.metric, self.restore, self.damping, self.selection)

    def to_dict(self) -> dict[str, Any]:
        extra = {}  # recorded only when set, so plans of earlier locks read back unchanged
        if self.selection != Scoring.selection:
            extra["selection"] = self.selection
        if self.error_correction:
            extra["error_correction"] = float(self.error_correction)
        if self.refine_steps:
            extra["refine_steps"], extra["refine_lr"] = self.refine_steps, self.refine_lr
        return {
            "metric": self.metric,
            "restore": self.restore,
            "damping": self.damping,
            **extra,
            "layers": {
                # a kept count of 0 (a removed branch) is recorded: `0 in (None, False)` dropped it
                str(i): {k: v for k, v in asdict(lp).items() if v is not None and v is not False}
                for i, lp in sorted(self.layers.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layers = {int(i): LayerPlan(**lp) for i, lp in d.get("layers", {}).items()}
        return cls(
            layers,
            d.get("metric", Scoring.metric),
            d.get("restore", Scoring.restore),
            d.get("damping", Scoring.damping),
            d.get("selection", Scoring.selection),
            float(d.get("error_correction", 0.0)),
            int(d.get("refine_steps", 0)),
            float(d.get("refine_lr", 1e-4)),
        )


def min_units(n: int, min_keep: float) -> int:
    """The fewest units a structure of `n` may keep under `budget.min_keep` (at least one)."""
    return max(1, math.ceil(min_keep * n))


def round_keep(n_keep: float, total: int, multiple_of: int = 1, minimum: int = 1) -> int:
    """Round a desired keep count to a multiple of `multiple_of`, within [minimum, total].

    `total` itself is always allowed (an unpruned layer need not be a multiple).
    """
    if n_keep >= total:
        return total
    m = max(1, multiple_of)
    if m >= total:
        m = 1
    k = int(round(n_keep / m)) * m
    k = max(k, int(math.ceil(minimum / m)) * m, m)
    return min(k, total)
