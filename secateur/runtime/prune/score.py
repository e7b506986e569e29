"""Unit importance from weights and input statistics (no forward passes here).

Every column metric is computed on the consuming projection (o_proj / down_proj / fc2)
and summed over the columns a unit owns, so one function scores MLP channels, query
heads and KV groups alike.
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.graph.groups import Group, Site
from secateur.graph.plan import Scoring
from secateur.runtime.prune.stats import InputStats

COLUMN_METRICS = ("fasp", "wanda", "magnitude", "fluctuation", "activation_norm")


def consumer_site(group: Group) -> Site:
    """The site through which a unit's output enters the residual stream (its input columns)."""
    sites = [s for s in group.sites if s.axis == 1 and s.param == "weight"]
    if len(sites) != 1:
        raise ValueError(f"group {group.name} has {len(sites)} consuming sites, expected 1")
    return sites[0]


def column_scores(weight: torch.Tensor, stats: InputStats | None, metric: str) -> torch.Tensor:
    """Score of each input column j of a consuming weight W [out, in].

    fasp/wanda: ||W[:, j]||_1 * ||X_j||_2 (FASP eq. for coupled column pruning).
    magnitude: ||W[:, j]||_1 alone (the activation-free floor).
    fluctuation: Var(X_j) * ||W[:, j]||_2^2 (FLAP).
    activation_norm: ||X_j||_2 alone.
    """
    w = weight.detach().to(torch.float32)
    if metric == "magnitude":
        return w.abs().sum(0)
    if stats is None:
        raise ValueError(f"metric {metric!r} needs calibration statistics")
    if metric in ("fasp", "wanda"):
        return w.abs().sum(0) * stats.col_norm
    if metric == "fluctuation":
        return stats.variance * w.pow(2).sum(0)
    if metric == "activation_norm":
        return stats.col_norm
    raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(COLUMN_METRICS)}")


def unit_scores(
    model: nn.Module, group: Group, stats: InputStats | None, metric: str = Scoring.metric
) -> torch.Tensor:
    """One score per unit of `group`: its columns' scores summed."""
    site = consumer_site(group)
    w = model.get_submodule(site.module).weight
    cols = column_scores(w, stats, metric)
    if site.fanout == 1:
        return cols.reshape(group.n_units, site.width).sum(1)
    idx = torch.tensor([list(site.indices(u)) for u in range(group.n_units)], device=cols.device)
    return cols[idx].sum(1)
