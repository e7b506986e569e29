"""Choosing units to keep from scores, and rounding widths to hardware-friendly multiples."""

from __future__ import annotations

import math

import torch


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
