"""Physical surgery: slice the sites of kept units into new, smaller tensors.

`apply_keep(model, adapter, keep)` is the one entry point every method uses. Indices in a
keep-set refer to the model's *current* shapes, so passes compose (prune heads, then MLP).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import SKIPPED_MARKER, Group, Site, layer_groups, layer_shapes
from secateur.graph.keep import KeepSet, KeepSetError
from secateur.runtime.prune.attention import VChannelAttention


class SkippedAttention(nn.Module):
    """Stands in for a removed attention branch: contributes zero, costs nothing.

    It still registers an empty KV entry in the cache so cache lengths (used for positions
    and masks during decoding) stay right when the first layer's attention is removed.
    """

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            b, t = hidden_states.shape[:2]
            empty = hidden_states.new_zeros((b, 0, t, self.head_dim))
            cache.update(empty, empty, self.layer_idx)
        return hidden_states.new_zeros(()), None


class SkippedMLP(nn.Module):
    """Stands in for a removed MLP branch: the residual passes through unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states.new_zeros(())


setattr(SkippedAttention, SKIPPED_MARKER, True)
setattr(SkippedMLP, SKIPPED_MARKER, True)


def _slice_param(module: nn.Module, site: Site, index: torch.Tensor) -> None:
    old = getattr(module, site.param)
    new = torch.index_select(old.data, site.axis, index.to(old.device))
    setattr(module, site.param, nn.Parameter(new.contiguous(), requires_grad=old.requires_grad))
    if isinstance(module, nn.Linear) and site.param == "weight":
        module.out_features, module.in_features = new.shape


def slice_group(model: nn.Module, group: Group, kept: Iterable[int]) -> None:
    """Keep only units `kept` of `group` in every site it touches."""
    kept = sorted(set(int(u) for u in kept))
    for s in group.sites:
        idx = torch.tensor(sorted(i for u in kept for i in s.indices(u)), dtype=torch.long)
        _slice_param(model.get_submodule(s.module), s, idx)


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def drop_attention(model: nn.Module, adapter: ModelAdapter, i: int) -> None:
    """Remove layer i's attention branch (module and branch-only norms)."""
    p = adapter.layer_prefix(i)
    _replace(model, f"{p}.{adapter.attn}", SkippedAttention(layer_idx=i, head_dim=adapter.head_dim))
    for n in adapter.attn_branch_norms:
        _replace(model, f"{p}.{n}", nn.Identity())


def drop_mlp(model: nn.Module, adapter: ModelAdapter, i: int) -> None:
    """Remove layer i's MLP branch; families without an MLP module get zero-width linears."""
    p = adapter.layer_prefix(i)
    if adapter.mlp_module is not None:
        _replace(model, f"{p}.{adapter.mlp_module}", SkippedMLP())
    else:
        slice_group(model, _group(model, adapter, i, "mlp_channel"), [])
        model.get_submodule(f"{p}.{adapter.mlp_out}").bias = None
    for n in adapter.mlp_branch_norms:
        _replace(model, f"{p}.{n}", nn.Identity())


def _check_range(name: str, values: list[int], n: int, i: int) -> None:
    bad = [v for v in values if not 0 <= v < n]
    if bad:
        raise KeepSetError(f"layer {i}, {name}: index {bad[0]} out of range [0, {n})")
    if len(set(values)) != len(values):
        raise KeepSetError(f"layer {i}, {name}: duplicate indices")


def _check_uniform(i: int, name: str, units: list[int], parts: int, per: int) -> None:
    """Units of `parts` equal partitions: every partition must keep the same number (>= 1)."""
    _check_range(name, units, parts * per, i)
    counts = [0] * parts
    for u in units:
        counts[u // per] += 1
    if len(set(counts)) != 1 or counts[0] == 0:
        raise KeepSetError(
            f"layer {i}, {name}: every KV group must keep the same number (>= 1) of units, got {counts}"
        )


def validate_keep(model: nn.Module, adapter: ModelAdapter, keep: KeepSet) -> None:
    """Check a keep-set against current shapes before touching any weight."""
    for i, lk in keep.items():
        if not 0 <= i < adapter.num_layers:
            raise KeepSetError(f"layer {i} does not exist (model has {adapter.num_layers} layers)")
        sh = layer_shapes(model, adapter, i)
        if lk.mlp is not None and not lk.drop_mlp:
            _check_range("mlp_channel", lk.mlp, int(sh["intermediate_size"]), i)
            if not lk.mlp:
                raise KeepSetError(
                    f"layer {i}, mlp_channel: keeps zero channels; use drop_mlp to remove the branch"
                )
        no_attn_keep = lk.kv_heads is None and lk.q_heads is None and lk.v_channels is None
        if lk.drop_attn or (sh["skip_attention"] and no_attn_keep):
            continue
        if sh["skip_attention"]:
            raise KeepSetError(
                f"layer {i}: attention units kept in a layer whose attention branch was removed"
            )
        n_q, n_kv = int(sh["num_heads"]), int(sh["num_kv_heads"])
        if lk.v_channels is not None:
            _check_uniform(i, "v_channel", lk.v_channels, n_kv, int(sh["v_head_dim"]))
        kv = list(range(n_kv)) if lk.kv_heads is None else list(lk.kv_heads)
        _check_range("kv_group", kv, n_kv, i)
        if not kv:
            raise KeepSetError(
                f"layer {i}, kv_group: keeps zero KV groups; use drop_attn to remove the branch"
            )
        if lk.q_heads is not None:
            r = n_q // n_kv
            _check_range("q_head", lk.q_heads, n_q, i)
            per = {g: 0 for g in kv}
            for h in lk.q_heads:
                if h // r not in per:
                    raise KeepSetError(
                        f"layer {i}, q_head: head {h} belongs to KV group {h // r}, which is removed"
                    )
                per[h // r] += 1
            counts = set(per.values())
            if len(counts) != 1 or 0 in counts:
                raise KeepSetError(
                    f"layer {i}, q_head: every kept KV group must keep the same number (>= 1) of query heads "
                    f"(GQA), got {per}"
                )


def apply_keep(model: nn.Module, adapter: ModelAdapter, keep: KeepSet) -> None:
    """Physically prune `model` in place to the keep-set (validated first, all or nothing)."""
    validate_keep(model, adapter, keep)
    for i, lk in sorted(keep.items()):
        attn_mod = model.get_submodule(f"{adapter.layer_prefix(i)}.{adapter.attn}")
        if lk.drop_mlp:
            drop_mlp(model, adapter, i)
        elif lk.mlp is not None:
            slice_group(model, _group(model, adapter, i, "mlp_channel"), lk.mlp)
        if lk.drop_attn:
            drop_attention(model, adapter, i)
            continue
        if lk.v_channels is not None:
            slice_group(model, _group(model, adapter, i, "v_channel"), lk.v_channels)
            _use_vchannel_attention(model, adapter, i)
            attn_mod = model.get_submodule(f"{adapter.layer_prefix(i)}.{adapter.attn}")
        if lk.kv_heads is None and lk.q_heads is None:
            continue
        sh = layer_shapes(model, adapter, i)
        n_kv = int(sh["num_kv_heads"])
        r = int(sh["num_heads"]) // n_kv
        kv = sorted(range(n_kv) if lk.kv_heads is None else lk.kv_heads)
        if lk.q_heads is not None:
            # query heads first, in the original numbering; groups about to go keep `per` dummies
            per = len(lk.q_heads) // len(kv)
            removed = [g for g in range(n_kv) if g not in kv]
            keep_q = sorted(list(lk.q_heads) + [g * r + j for g in removed for j in range(per)])
            slice_group(model, _group(model, adapter, i, "q_head"), keep_q)
        if len(kv) < n_kv:
            slice_group(model, _group(model, adapter, i, "kv_group"), kv)
        new = layer_shapes(model, adapter, i)
        adapter.set_head_counts(attn_mod, int(new["num_heads"]), int(new["num_kv_heads"]))


def _use_vchannel_attention(model: nn.Module, adapter: ModelAdapter, i: int) -> None:
    """Swap in Secateur's attention once values are narrower than queries (HF cannot run it)."""

    path = f"{adapter.layer_prefix(i)}.{adapter.attn}"
    attn = model.get_submodule(path)
    sh = layer_shapes(model, adapter, i)
    if sh["v_head_dim"] != sh["head_dim"] and not getattr(attn, "secateur_v_channel", False):
        if not adapter.rope:
            raise KeepSetError(
                f"layer {i}, v_channel: {adapter.config.model_type} attention is not supported"
            )
        _replace(model, path, VChannelAttention(attn, adapter.head_dim))


def _group(model: nn.Module, adapter: ModelAdapter, i: int, kind: str) -> Group:
    return next(g for g in layer_groups(model, adapter, i) if g.kind == kind)
