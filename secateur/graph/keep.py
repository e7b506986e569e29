"""Keep-sets: which units of each decoder layer survive, in the layer's current numbering.

A keep-set is what selection produces, what surgery applies and what a lock records.
"""

from __future__ import annotations

from dataclasses import dataclass


class KeepSetError(ValueError):
    """A keep-set that cannot be applied (out of range, GQA-breaking, emptying a layer)."""


@dataclass
class LayerKeep:
    """What to keep in one decoder layer. None means keep everything of that kind.

    mlp: kept MLP channel indices. kv_heads: kept KV groups (with all their query heads).
    q_heads: kept query heads, absolute indices in the current numbering; every kept KV
    group must keep the same number (GQA repeats KV heads uniformly).
    v_channels: kept value channels g * v_head_dim + c (FASP's W_V row / W_O column unit); every
    KV group keeps the same number. Applied before heads, in the numbering the layer has now.
    drop_attn / drop_mlp: remove the whole residual branch.
    """

    mlp: list[int] | None = None
    kv_heads: list[int] | None = None
    q_heads: list[int] | None = None
    v_channels: list[int] | None = None
    drop_attn: bool = False
    drop_mlp: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v not in (None, False)}


KeepSet = dict[int, LayerKeep]
