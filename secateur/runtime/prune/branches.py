"""Sublayer candidates (an attention or MLP branch, or a whole block) and their temporary removal,
shared by BlockPruner/SPRINT's greedy loop and SPRINT's latency table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import linear_params
from secateur.graph.groups import layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.recipe.schema import Targets
from secateur.runtime.prune.snapshot import ModuleSnapshot
from secateur.runtime.prune.surgery import drop_attention, drop_mlp

BRANCHES = ("attn", "mlp")


@dataclass(frozen=True)
class Candidate:
    """Branches of one layer removed together: ("attn",), ("mlp",) or both (a block)."""

    layer: int
    branches: tuple[str, ...]

    @property
    def name(self) -> str:
        return "block" if len(self.branches) == 2 else self.branches[0]

    def keep(self) -> LayerKeep:
        return LayerKeep(drop_attn="attn" in self.branches, drop_mlp="mlp" in self.branches)


def branch_params(model: nn.Module, adapter: ModelAdapter, i: int) -> dict[str, int]:
    """Decoder linear parameters (the budget's unit) of each branch layer i still has."""
    # layer_shapes, not graph.groups.sublayer_groups: the latter reads `.weight` of branch norms,
    # which fails once a branch is removed (its norms are Identity)
    sh = layer_shapes(model, adapter, i)
    layer = adapter.layers(model)[i]
    out: dict[str, int] = {}
    if not sh["skip_attention"]:
        out["attn"] = linear_params(layer.get_submodule(adapter.attn))
    if not sh["skip_mlp"]:
        out["mlp"] = sum(linear_params(layer.get_submodule(m)) for m in (*adapter.mlp_in, adapter.mlp_out))
    return out


def candidates(
    model: nn.Module, adapter: ModelAdapter, layers: list[int], targets: Targets
) -> list[Candidate]:
    """Remaining candidates: branches with `targets.sublayers`, whole blocks with `targets.blocks`."""
    out: list[Candidate] = []
    for i in layers:
        present = tuple(b for b in BRANCHES if b in branch_params(model, adapter, i))
        if targets.sublayers:
            out += [Candidate(i, (b,)) for b in present]
        if targets.blocks and present and not (targets.sublayers and len(present) == 1):
            out.append(Candidate(i, present))
    return out


@contextmanager
def without(model: nn.Module, adapter: ModelAdapter, cand: Candidate) -> Iterator[None]:
    """The model with `cand` removed inside the block, exactly as before after it (no weight copies):
    the branch module becomes SkippedAttention / SkippedMLP, its norms Identity, then all is put back."""
    layer = adapter.layers(model)[cand.layer]
    snap = ModuleSnapshot([layer])
    try:
        with torch.no_grad():
            if "attn" in cand.branches:
                drop_attention(model, adapter, cand.layer)
            if "mlp" in cand.branches:
                drop_mlp(model, adapter, cand.layer)
        yield
    finally:
        snap.restore()
