"""Choosing units to keep from scores: the one selection rule every method and the search use."""

from __future__ import annotations

from collections.abc import Callable

import torch

from secateur.graph.keep import LayerKeep
from secateur.graph.plan import LayerPlan


def top_units(scores: torch.Tensor, n_keep: int, partitions: int = 1) -> list[int]:
    """Indices of the `n_keep` best units, or the best `n_keep` inside each partition.

    Partitions model GQA: query heads are chosen per KV group, the same count in each.
    Ties break by index so selection is deterministic.
    """
    n = scores.numel()
    if partitions == 1:
        order = sorted(range(n), key=lambda j: (-float(scores[j]), j))
        return sorted(order[:n_keep])
    per = n // partitions
    out: list[int] = []
    for g in range(partitions):
        block = scores[g * per : (g + 1) * per]
        order = sorted(range(per), key=lambda j: (-float(block[j]), j))
        out += [g * per + j for j in sorted(order[:n_keep])]
    return out


def kept_columns(units: list[int], width: int) -> torch.Tensor:
    """Column indices owned by the kept units of a contiguous consuming site."""
    return torch.tensor([c for u in units for c in range(u * width, (u + 1) * width)], dtype=torch.long)


Chooser = Callable[[str, int, int], list[int]]  # (unit kind, units to keep, partitions) -> kept units


def by_score(score: Callable[[str], torch.Tensor]) -> Chooser:
    """The fixed-score rule: keep the best-scored units (`score(kind)` gives one score per unit)."""
    return lambda kind, n_keep, partitions: top_units(score(kind), n_keep, partitions)


def select_units(lp: LayerPlan, n_units: dict[str, int], choose: Chooser) -> LayerKeep:
    """The keep-set of one layer under its plan: for every pruned kind, the units `choose` keeps.

    `n_units` maps unit kinds (mlp_channel, kv_group, q_head, v_channel) to their current counts;
    `choose` is only asked about kinds the plan prunes (`by_score` for fixed scores, or OBS).
    Query heads are chosen per KV group and dropped with their group when the group goes.
    """
    lk = LayerKeep(drop_attn=lp.drop_attn, drop_mlp=lp.drop_mlp)
    if lp.mlp is not None and not lp.drop_mlp and lp.mlp < n_units.get("mlp_channel", 0):
        lk.mlp = choose("mlp_channel", lp.mlp, 1)
    if lp.drop_attn or "kv_group" not in n_units:
        return lk
    n_kv = n_units["kv_group"]
    if lp.kv_groups is not None and lp.kv_groups < n_kv:
        lk.kv_heads = choose("kv_group", lp.kv_groups, 1)
    r = n_units["q_head"] // n_kv
    if lp.q_per_group is not None and lp.q_per_group < r:
        kept_kv = set(lk.kv_heads if lk.kv_heads is not None else range(n_kv))
        chosen = choose("q_head", lp.q_per_group, n_kv)
        lk.q_heads = [h for h in chosen if h // r in kept_kv]
    if lp.v_per_group is not None and lp.v_per_group < n_units.get("v_channel", 0) // n_kv:
        lk.v_channels = choose("v_channel", lp.v_per_group, n_kv)
    return lk
