"""Bonsai's regression parts: variables (units masked, scored and removed together), column masks
(virtual sub-models without weight copies), the ridge fit of loss on masks, and the selection of
the lowest-coefficient variables. The rounds that use them are `runtime/methods/bonsai.py`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups, layer_shapes
from secateur.runtime.prune.capture import base_model
from secateur.runtime.prune.score import column_scores
from secateur.runtime.prune.stats import collect_inputs

STATS_BATCH = 4


@dataclass
class Variable:
    """One regression variable: units of one layer that are masked, scored and removed together."""

    layer: int
    kind: str  # mlp | q_head | kv_group
    units: tuple[int, ...]  # current indices: MLP channels, query heads or KV groups
    consumer: str  # module whose input columns the units own (down_proj / fc2 / o_proj)
    cols: torch.Tensor  # those columns, current numbering
    params: int
    prior: float


class ColumnNorms:
    """Squared column norms of a linear layer's input (the prior needs nothing more)."""

    def __init__(self, dim: int, device: torch.device) -> None:
        self.sq = torch.zeros(dim, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        self.sq += x.reshape(-1, x.shape[-1]).to(torch.float32).pow(2).sum(0)

    @property
    def col_norm(self) -> torch.Tensor:
        return self.sq.sqrt()


@contextmanager
def column_norms(modules: dict[str, nn.Linear]) -> Iterator[dict[str, ColumnNorms]]:
    stats = {n: ColumnNorms(m.in_features, m.weight.device) for n, m in modules.items()}
    handles = [
        m.register_forward_pre_hook(lambda _m, args, n=n: stats[n].add(args[0])) for n, m in modules.items()
    ]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


@contextmanager
def column_masks(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """0/1 masks multiplying the inputs of the named linear layers while active (a virtual sub-model)."""
    masks: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        mod = model.get_submodule(n)
        masks[n] = torch.ones(mod.in_features, dtype=mod.weight.dtype, device=mod.weight.device)
        handles.append(mod.register_forward_pre_hook(lambda _m, args, n=n: (args[0] * masks[n], *args[1:])))
    try:
        yield masks
    finally:
        for h in handles:
            h.remove()


def fit_importance(kept: torch.Tensor, loss: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge regression of -loss on 0/1 kept masks [samples, variables], intercept unpenalised.

    Returns one coefficient per variable: the loss increase its removal is estimated to cause.
    Uses the dual form when there are fewer samples than variables.
    """
    x = kept.to(torch.float64)
    y = -loss.to(torch.float64)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean()
    s, c = x.shape
    if s < c:
        a = x @ x.T + ridge * torch.eye(s, dtype=x.dtype)
        alpha = torch.linalg.pinv(a) @ y if ridge == 0 else torch.linalg.solve(a, y)
        return x.T @ alpha
    a = x.T @ x + ridge * torch.eye(c, dtype=x.dtype)
    b = x.T @ y
    return torch.linalg.pinv(a) @ b if ridge == 0 else torch.linalg.solve(a, b)


@torch.inference_mode()
def consumer_statistics(
    model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, names: list[str], gram: bool
) -> dict:
    """One forward pass of the decoder (no LM head) over `ids`, collecting consumer statistics."""
    modules = {n: model.get_submodule(n) for n in names}
    dev = next(model.parameters()).device
    ctx = collect_inputs(modules) if gram else column_norms(modules)
    with ctx as stats:
        for s in range(0, ids.shape[0], STATS_BATCH):
            base_model(model, adapter)(input_ids=ids[s : s + STATS_BATCH].to(dev), use_cache=False)
    return stats


def layer_variables(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    kinds: list[str],
    stats: dict,
    m: int,
    use_prior: bool,
    odd: int,
) -> tuple[list[int], dict[str, list[Variable]]]:
    """Layer i's variables per kind, lowest prior first, and MLP channels to remove outright."""
    p = adapter.layer_prefix(i)
    groups = {g.kind: g for g in layer_groups(model, adapter, i)}
    out: dict[str, list[Variable]] = {}
    forced: list[int] = []
    if "mlp" in kinds and "mlp_channel" in groups:
        g = groups["mlp_channel"]
        name = f"{p}.{adapter.mlp_out}"
        score = column_scores(model.get_submodule(name).weight, stats[name], "fasp").cpu()
        order = (
            sorted(range(g.n_units), key=lambda j: (float(score[j]), j))
            if use_prior
            else list(range(g.n_units))
        )
        forced, order = sorted(order[:odd]), order[odd:]
        out["mlp"] = [
            Variable(
                i,
                "mlp",
                tuple(sorted(blk)),
                name,
                torch.tensor(sorted(blk)),
                m * g.params_per_unit,
                float(score[blk].sum()),
            )
            for blk in (order[b * m : (b + 1) * m] for b in range(len(order) // m))
        ]
    if ("q_head" in kinds or "kv_group" in kinds) and "kv_group" in groups:
        name = f"{p}.{adapter.o}"
        sh = layer_shapes(model, adapter, i)
        n_q, n_kv, dv = int(sh["num_heads"]), int(sh["num_kv_heads"]), int(sh["v_head_dim"])
        r = n_q // n_kv
        col = column_scores(model.get_submodule(name).weight, stats[name], "fasp").cpu()
        head = col.reshape(n_q, dv).sum(1)

        def cols(heads: list[int]) -> torch.Tensor:
            return torch.tensor([c for h in sorted(heads) for c in range(h * dv, (h + 1) * dv)])

        if "q_head" in kinds:
            per = groups["q_head"].params_per_unit
            ranked = [
                sorted(range(g * r, (g + 1) * r), key=lambda h: (float(head[h]), h) if use_prior else h)
                for g in range(n_kv)
            ]
            slots = [[ranked[g][j] for g in range(n_kv)] for j in range(r)]
            vs = [
                Variable(i, "q_head", tuple(sorted(s)), name, cols(s), n_kv * per, float(head[s].sum()))
                for s in slots
            ]
        else:
            per = groups["kv_group"].params_per_unit
            vs = [
                Variable(
                    i,
                    "kv_group",
                    (g,),
                    name,
                    cols(list(range(g * r, (g + 1) * r))),
                    per,
                    float(head[g * r : (g + 1) * r].sum()),
                )
                for g in range(n_kv)
            ]
            if use_prior:
                vs.sort(key=lambda v: (v.prior, v.units))
        out["q_head" if "q_head" in kinds else "kv_group"] = vs
    return forced, out


def select_global(
    cands: list[Variable],
    others: list[Variable],
    score: dict[int, float],
    quota: int,
    limit: dict[tuple[int, str], int],
    last: bool,
) -> list[Variable]:
    """Candidates by coefficient per parameter until the quota is met (rounded to the nearest unit)."""
    chosen: list[Variable] = []
    used: dict[tuple[int, str], int] = {}
    removed = 0
    order = sorted(range(len(cands)), key=lambda j: (score[j] / cands[j].params, cands[j].prior, j))
    pools = [[cands[j] for j in order]] + ([others] if last else [])
    for pool in pools:  # the last round falls back to the prior order if candidates run out
        for v in pool:
            key = (v.layer, v.kind)
            if quota - removed >= v.params / 2 and used.get(key, 0) < limit.get(key, 0):
                chosen.append(v)
                used[key] = used.get(key, 0) + 1
                removed += v.params
    return chosen


def select_plan(
    cands: list[Variable], score: dict[int, float], limit: dict[tuple[int, str], int]
) -> list[Variable]:
    """Plan mode: in every layer and kind, the lowest-coefficient candidates up to the round's count."""
    chosen: list[Variable] = []
    by_key: dict[tuple[int, str], list[int]] = {}
    for j, v in enumerate(cands):
        by_key.setdefault((v.layer, v.kind), []).append(j)
    for key, js in by_key.items():
        js.sort(key=lambda j: (score[j], cands[j].prior, j))
        chosen += [cands[j] for j in js[: limit[key]]]
    return chosen
