"""FLOP counts follow surgery exactly; the alternating timer returns sane medians."""

from __future__ import annotations

import copy
import math

import pytest

from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.graph.keep import LayerKeep
from secateur.runtime.measure.timing import measure_speed, speed_ratios
from secateur.runtime.prune.surgery import apply_keep, drop_attention
from secateur.testing import tiny_model


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_flops_drop_by_removed_mlp_macs(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    before = flops_per_token(model, adapter, context=64)
    params_before = decoder_linear_params(model, adapter)
    apply_keep(model, adapter, {0: LayerKeep(mlp=list(range(10)))})
    removed = 96 - 10
    n_linears = len(adapter.mlp_in) + 1
    assert before - flops_per_token(model, adapter, context=64) == 2 * n_linears * 64 * removed
    bias = 1 if family == "opt" else 0  # fc1 loses one bias per channel
    assert params_before - decoder_linear_params(model, adapter) == removed * (n_linears * 64 + bias)


def test_attention_flops_and_skipped_sublayer() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    # 4 query heads, head_dim 16: QK^T and AV cost 2 * 4 * (16 + 16) * context per layer
    attn = flops_per_token(model, adapter, context=100) - flops_per_token(model, adapter, context=0)
    assert attn == 3 * 2 * 4 * 32 * 100
    before = flops_per_token(model, adapter, context=100)
    drop_attention(model, adapter, 1)
    qkvo = 64 * 64 + 2 * 64 * 32 + 64 * 64
    assert before - flops_per_token(model, adapter, context=100) == 2 * qkvo + 2 * 4 * 32 * 100


def test_sliding_window_caps_attention_span() -> None:
    model = tiny_model("gemma3_text")  # layers 0 and 2 slide over 8 positions
    adapter = adapter_for(model.config)
    attn = flops_per_token(model, adapter, context=100) - flops_per_token(model, adapter, context=0)
    assert attn == 2 * 4 * 32 * (8 + 100 + 8)


def test_tied_embeddings_counted_once() -> None:
    model = tiny_model("qwen3")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert total_params(model) == sum(p.numel() for p in model.parameters())
    assert total_params(model) < sum(p.numel() for p in model.state_dict().values())


def test_measure_speed_alternates_two_models() -> None:
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    adapter = adapter_for(pruned.config)
    apply_keep(pruned, adapter, {0: LayerKeep(mlp=list(range(10)))})
    drop_attention(pruned, adapter, 0)
    res = measure_speed(
        {"dense": dense, "pruned": pruned}, vocab_size=128, prefill_len=16, decode_tokens=4, repeats=2
    )
    assert set(res) == {"dense", "pruned"}
    for r in res.values():
        for v in (r.prefill_tok_s, r.decode_tok_s, r.prefill_s_median, r.decode_s_median):
            assert math.isfinite(v) and v > 0
        assert r.device == "cpu" and r.peak_mem_bytes is None
    assert res["pruned"].weights_bytes < res["dense"].weights_bytes
    ratios = speed_ratios(res)
    assert ratios["dense"]["prefill_speedup"] == 1.0
    assert 0 < ratios["pruned"]["weights_ratio"] < 1
    with pytest.raises(KeyError, match="baseline"):
        speed_ratios(res, baseline="nope")
