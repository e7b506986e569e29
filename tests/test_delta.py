"""The sequential pass's shortcut for MLP-only layers (runtime/prune/delta.py) against running the layer again."""

from __future__ import annotations

import pytest
import torch

from secateur.graph.adapters import adapter_for
from secateur.graph.plan import LayerPlan, Plan
from secateur.runtime.prune import delta
from secateur.runtime.prune.sequential import prune_sequential
from secateur.testing import TINY_FAMILIES, tiny_model

IDS = torch.randint(0, 128, (6, 40), generator=torch.Generator().manual_seed(3))


def _pruned(family: str, plan: Plan, restore: str) -> tuple[torch.nn.Module, dict, int]:
    """The pruned model, its keep-sets and how many times a decoder layer ran."""
    model = tiny_model(family)
    ad = adapter_for(model.config)
    plan.restore = restore
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in ad.layers(model)]
    res = prune_sequential(model, ad, IDS, plan, batch_size=4, progress=False)
    for h in hooks:
        h.remove()
    return model, {i: lk.to_dict() for i, lk in res.keep.items()}, len(calls)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("restore", ["least_squares", "bias_compensation"])
def test_patched_outputs_equal_a_second_forward(
    family: str, restore: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every later layer's selection and restoration read the patched outputs: the models agree."""
    plan = Plan({i: LayerPlan(mlp=40 - 8 * i) for i in range(3)})
    fast, keep_fast, runs_fast = _pruned(family, plan, restore)
    monkeypatch.setattr(delta, "ACTIVATION_CACHE_BYTES", 0)  # too little room: the layer runs again
    slow, keep_slow, runs_slow = _pruned(
        family, Plan({i: LayerPlan(mlp=40 - 8 * i) for i in range(3)}), restore
    )
    assert keep_fast == keep_slow
    assert runs_slow == 2 * 3 * 2  # two batches, three layers, statistics pass + next inputs
    exact = adapter_for(fast.config).mlp_adds_to_residual
    assert runs_fast == (runs_slow // 2 if exact else runs_slow)
    with torch.no_grad():
        a, b = fast(IDS).logits, slow(IDS).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_shortcut_taken_only_where_exact() -> None:
    """Attention pruned, a removed MLP branch or a norm after down_proj: the layer runs again."""
    hidden = [torch.zeros(2, 8, 64)]
    llama = tiny_model("llama")
    ad = adapter_for(llama.config)
    assert delta.mlp_only_recorder(llama, ad, 0, LayerPlan(mlp=32), hidden) is not None
    assert delta.mlp_only_recorder(llama, ad, 0, LayerPlan(mlp=32, q_per_group=1), hidden) is None
    assert delta.mlp_only_recorder(llama, ad, 0, LayerPlan(mlp=0, drop_mlp=True), hidden) is None
    if "gemma3_text" in TINY_FAMILIES:
        gemma = tiny_model("gemma3_text")
        assert delta.mlp_only_recorder(gemma, adapter_for(gemma.config), 0, LayerPlan(mlp=32), hidden) is None
