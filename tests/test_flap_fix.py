"""FLAP's global ranking standardises *columns* per layer and module, then averages per unit.

Regression: `global_plan` used to z-score the per-unit sums of a layer's attention units (2-3 query
slots or KV groups per layer). Standardising a handful of values always gives the weakest one
z ~ -1 (exactly -1 for two units), however alike the heads are, while heavy-tailed MLP channel
scores rarely fall below z ~ -0.5; so every layer lost attention first, whatever its importance
(SmolLM2-135M, flap-20: 6.1x dense perplexity instead of 2x).

The statistics here are synthetic, so the expected plan is exact: the fluctuation score of column j
is Var(X_j) * ||W[:, j]||^2, and we choose Var(X_j) so that the scores are the ones written below.
"""

from __future__ import annotations

import pytest
import torch

from secateur.graph.adapters import adapter_for
from secateur.recipe.compile import BudgetSpec
from secateur.runtime.allocation.dense import DenseStats
from secateur.runtime.allocation.plans import global_plan
from secateur.runtime.prune.stats import InputStats
from secateur.testing import tiny_model

LAYERS = [0, 1, 2, 3]
WEAK_LAYER = 2


def _stats_with_scores(weight: torch.Tensor, scores: torch.Tensor) -> InputStats:
    """Input statistics (mean 0) whose fluctuation scores on `weight` are exactly `scores`."""
    var = scores.double() / weight.detach().double().pow(2).sum(0)
    return InputStats(torch.diag(var).float(), torch.zeros(weight.shape[1]), n=1)


def _dense(model, adapter, weak_heads: list[int]) -> DenseStats:
    """MLP channels: 8 strong (100) and 88 weak (1), z(weak) ~ -0.30 in every layer.

    Attention: every head owns the same column scores 1..16 (heads alike up to 1e-4), except in
    WEAK_LAYER, where `weak_heads` are 100x weaker than the others (their mean column z ~ -0.8).
    """
    stats = {}
    n_heads, d = model.config.num_attention_heads, model.config.head_dim
    for i in LAYERS:
        p = adapter.layer_prefix(i)
        o = model.get_submodule(f"{p}.{adapter.o}").weight
        down = model.get_submodule(f"{p}.{adapter.mlp_out}").weight
        heads = []
        for h in range(n_heads):
            s = torch.arange(1.0, d + 1) * (1 + 1e-4 * h)
            heads.append(s * 0.01 if i == WEAK_LAYER and h in weak_heads else s)
        mlp = torch.cat([torch.full((8,), 100.0), torch.ones(down.shape[1] - 8)])
        stats[i] = {
            f"{p}.{adapter.o}": _stats_with_scores(o, torch.cat(heads)),
            f"{p}.{adapter.mlp_out}": _stats_with_scores(down, mlp),
        }
    return DenseStats(stats, {i: 0.1 for i in LAYERS})


@pytest.mark.parametrize(
    "attention,weak_heads,field",
    [
        ("q_head", [0, 2], "q_per_group"),  # the first query head of both KV groups (2 x 2 heads)
        ("kv_group", [2, 3], "kv_groups"),  # both query heads of KV group 1
    ],
)
def test_global_plan_prunes_attention_only_where_it_is_weak(
    attention: str, weak_heads: list[int], field: str
) -> None:
    model = tiny_model("llama", num_hidden_layers=len(LAYERS))
    adapter = adapter_for(model.config)
    dense = _dense(model, adapter, weak_heads)
    spec = BudgetSpec(fraction=0.3, attention=attention, multiple_of=1)
    plan = global_plan(model, adapter, spec, LAYERS, dense, "fluctuation", "bias_compensation", 0.01)
    attn = {i: getattr(lp, field) for i, lp in plan.layers.items() if getattr(lp, field) is not None}
    # only the layer with clearly weak heads loses attention; alike heads (z ~ 0) outrank the weak
    # MLP channels (z ~ -0.3), which pay the rest of the budget in every layer
    assert attn == {WEAK_LAYER: 1}
    assert all(plan.layers[i].mlp is not None and plan.layers[i].mlp < 96 for i in LAYERS)
    assert all(plan.layers[i].mlp >= 8 for i in LAYERS)  # the 8 strong channels survive everywhere
