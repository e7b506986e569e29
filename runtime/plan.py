"""A plan: how many units of each kind every layer keeps. The runtime executes plans.

Plans are what recipes compile to and what the search explores; which units are kept is
decided later by scores (or, in a lock, recorded explicitly).
"""

from __future__ import annotations

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


@dataclass
class Plan:
    """Per-layer kept counts plus how units are scored and restored."""

    layers: dict[int, LayerPlan] = field(default_factory=dict)
    metric: str = "fasp"
    restore: str = "least_squares"
    damping: float = 0.01

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "restore": self.restore,
            "damping": self.damping,
            "layers": {
                str(i): {k: v for k, v in asdict(lp).items() if v not in (None, False)}
                for i, lp in sorted(self.layers.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        layers = {int(i): LayerPlan(**lp) for i, lp in d.get("layers", {}).items()}
        return cls(layers, d.get("metric", "fasp"), d.get("restore", "least_squares"), d.get("damping", 0.01))
