"""Physically removing units gives the same logits as masking them in the dense model."""

from __future__ import annotations

import copy

import pytest
import torch

from secateur.graph.adapters import adapter_for
from secateur.graph.groups import layer_groups, layer_shapes
from secateur.graph.keep import KeepSet, KeepSetError, LayerKeep
from secateur.runtime.prune.surgery import apply_keep
from secateur.testing import TINY_FAMILIES, tiny_model

from .conftest import input_ids


def _mask(model, adapter, keep: KeepSet) -> None:
    """Zero the consuming columns (and branch biases) of removed units in the dense model."""
    with torch.no_grad():
        for i, lk in keep.items():
            p = adapter.layer_prefix(i)
            sh = layer_shapes(model, adapter, i)
            down = model.get_submodule(f"{p}.{adapter.mlp_out}")
            o = model.get_submodule(f"{p}.{adapter.o}")
            if lk.drop_mlp:
                down.weight.zero_()
                if down.bias is not None:
                    down.bias.zero_()
            elif lk.mlp is not None:
                gone = [c for c in range(down.in_features) if c not in lk.mlp]
                down.weight[:, gone] = 0
            d = int(sh["head_dim"])
            r = int(sh["num_heads"]) // int(sh["num_kv_heads"])
            if lk.drop_attn:
                o.weight.zero_()
                if o.bias is not None:
                    o.bias.zero_()
                continue
            kept_heads = set(range(int(sh["num_heads"])))
            if lk.kv_heads is not None:
                kept_heads = {h for h in kept_heads if h // r in lk.kv_heads}
            if lk.q_heads is not None:
                kept_heads &= set(lk.q_heads)
            for h in range(int(sh["num_heads"])):
                if h not in kept_heads:
                    o.weight[:, h * d : (h + 1) * d] = 0
                elif lk.v_channels is not None:
                    g = h // r
                    for c in range(d):
                        if g * d + c not in lk.v_channels:
                            o.weight[:, h * d + c] = 0


KEEPS = {
    "mixed": {
        0: LayerKeep(mlp=[0, 3, 5, 7, 11, 40, 95], q_heads=[1, 2]),
        1: LayerKeep(kv_heads=[1], mlp=list(range(0, 96, 2))),
        2: LayerKeep(drop_attn=True, mlp=list(range(50))),
    },
    "drops": {
        0: LayerKeep(drop_mlp=True),
        1: LayerKeep(drop_attn=True, drop_mlp=True),
        2: LayerKeep(q_heads=[0, 3]),
    },
    "kv_and_q": {0: LayerKeep(kv_heads=[0], q_heads=[1]), 2: LayerKeep(kv_heads=[1], q_heads=[2, 3])},
    "v_channels": {
        0: LayerKeep(v_channels=[0, 1, 5, 16 + 2, 16 + 3, 16 + 9]),
        1: LayerKeep(v_channels=[c for c in range(32) if c % 4], q_heads=[0, 3], mlp=list(range(8))),
        2: LayerKeep(v_channels=[3, 16 + 4], kv_heads=[1]),
    },
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", sorted(KEEPS))
def test_physical_equals_masked(family: str, case: str) -> None:
    dense = tiny_model(family)
    adapter = adapter_for(dense.config)
    keep = copy.deepcopy(KEEPS[case])
    if family in ("opt", "gemma2") and case == "v_channels":
        pytest.skip("v_channel needs a RoPE family without attention logit soft-capping")
    if family == "opt":  # MHA: one query head per KV group, so q_head keep-sets become kv_group ones
        for lk in keep.values():
            if lk.q_heads is not None:
                lk.kv_heads, lk.q_heads = sorted(set(lk.q_heads) | set(lk.kv_heads or [])), None
    masked = copy.deepcopy(dense)
    _mask(masked, adapter, keep)
    pruned = copy.deepcopy(dense)
    apply_keep(pruned, adapter, keep)
    ids = input_ids()
    with torch.no_grad():
        ref = masked(ids).logits
        out = pruned(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    n_dense = sum(p.numel() for p in dense.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_dense


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_generate_with_cache_after_dropping_first_attention(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    apply_keep(
        model,
        adapter,
        {0: LayerKeep(drop_attn=True), 1: LayerKeep(q_heads=[0, 2]), 2: LayerKeep(v_channels=[1, 2, 17, 30])},
    )
    ids = input_ids(batch=1, seq=6)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
        nocache = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(gen, nocache)


def test_shapes_after_keep() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    apply_keep(model, adapter, {1: LayerKeep(kv_heads=[1], q_heads=[3], mlp=list(range(16)))})
    sh = layer_shapes(model, adapter, 1)
    assert (sh["num_heads"], sh["num_kv_heads"], sh["intermediate_size"]) == (1, 1, 16)
    assert model.model.layers[1].self_attn.num_key_value_groups == 1
    kinds = {g.kind: g.n_units for g in layer_groups(model, adapter, 1)}
    assert kinds == {"mlp_channel": 16, "kv_group": 1, "q_head": 1, "v_channel": 16}


@pytest.mark.parametrize(
    "keep,msg",
    [
        ({0: LayerKeep(mlp=[0, 96])}, "layer 0, mlp_channel: index 96 out of range"),
        ({0: LayerKeep(mlp=[])}, "layer 0, mlp_channel: keeps zero channels"),
        ({5: LayerKeep(mlp=[0])}, "layer 5 does not exist"),
        ({1: LayerKeep(q_heads=[0, 1, 2])}, "layer 1, q_head: every kept KV group must keep the same number"),
        ({2: LayerKeep(kv_heads=[])}, "layer 2, kv_group: keeps zero KV groups"),
        ({0: LayerKeep(kv_heads=[0], q_heads=[2])}, "layer 0, q_head: head 2 belongs to KV group 1"),
        ({0: LayerKeep(mlp=[1, 1])}, "duplicate"),
        (
            {0: LayerKeep(v_channels=[0, 1, 16])},
            "layer 0, v_channel: every KV group must keep the same number",
        ),
        ({1: LayerKeep(v_channels=[32])}, "layer 1, v_channel: index 32 out of range"),
    ],
)
def test_bad_keep_sets_name_layer_group_value(keep: KeepSet, msg: str) -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeepSetError, match=msg):
        apply_keep(model, adapter_for(model.config), keep)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
