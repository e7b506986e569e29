"""Bonsai (forward-only perturbative regression) on tiny local models."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_shapes
from secateur.graph.plan import Plan
from secateur.lock import LOCK_NAME
from secateur.recipe.compile import planned_removal
from secateur.recipe.schema import Recipe
from secateur.runtime.methods import get_method
from secateur.runtime.methods.bonsai import bonsai_prune, fit_importance
from secateur.runtime.prune.stage import StageContext
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.testing import save_tiny, tiny_model

from .conftest import input_ids


def _ctx(
    model,
    attention: str = "q_head",
    params: float = 0.3,
    seed: int = 0,
    restore: str = "least_squares",
    **bonsai,
) -> StageContext:
    opts = {"samples": 16, "steps": 2, **bonsai}
    recipe = Recipe.model_validate(
        {
            "method": "bonsai",
            "calibration": {"seed": seed},
            "targets": {"mlp": True, "attention": attention},
            "budget": {"params": params, "multiple_of": 4},
            "importance": {"metric": "bonsai", "bonsai": opts},
            "restore": {"method": restore},
        }
    )
    adapter = adapter_for(model.config)
    count = int(round(params * decoder_linear_params(model, adapter)))
    return StageContext(
        model,
        adapter,
        input_ids(batch=8, seq=48, seed=1),
        input_ids(batch=4, seq=48, seed=2),
        recipe.stages()[0],
        recipe,
        count,
        list(range(adapter.num_layers)),
        progress=False,
        log=lambda s: None,
    )


def _shapes(model) -> list[dict]:
    adapter = adapter_for(model.config)
    return [layer_shapes(model, adapter, i) for i in range(adapter.num_layers)]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_reaches_budget_and_keep_is_in_starting_numbering(family: str) -> None:
    model = tiny_model(family)
    ctx = _ctx(model)
    total = decoder_linear_params(model, ctx.adapter)
    res = get_method("bonsai")(ctx)
    removed = total - decoder_linear_params(model, ctx.adapter)
    # exactly the FASP plan's widths, which meet the goal within a multiple_of step per layer
    assert removed == planned_removal(tiny_model(family), ctx.adapter, Plan.from_dict(res.extra["plan"]))
    assert abs(removed - ctx.params_to_remove) <= 3 * 2 * 3 * 64
    assert res.extra["removed_params"] == removed
    assert res.extra["forward_passes"] == 2 * (16 + 1)
    assert [r["round"] for r in res.extra["rounds"]] == [1, 2]
    yaml.safe_dump(res.extra)  # the lock stores it
    # the keep-set, in the dense numbering, rebuilds the same architecture in one call
    fresh = tiny_model(family)
    apply_keep(fresh, ctx.adapter, res.keep)
    assert _shapes(fresh) == _shapes(model)
    for lk in res.keep.values():
        assert lk.mlp is not None and len(lk.mlp) % 4 == 0
        assert lk.q_heads is not None and len(lk.q_heads) == 2  # one head per KV group left
    with torch.no_grad():
        assert torch.isfinite(model(input_ids(batch=2, seq=16, seed=3)).logits).all()


def test_global_allocation_reaches_budget_with_kv_groups() -> None:
    model = tiny_model("qwen2")
    ctx = _ctx(model, attention="kv_group")
    ctx.recipe = ctx.recipe.model_copy(
        update={"allocation": ctx.recipe.allocation.model_copy(update={"method": "global"})}
    )
    total = decoder_linear_params(model, ctx.adapter)
    res = get_method("bonsai")(ctx)
    removed = total - decoder_linear_params(model, ctx.adapter)
    assert res.extra["allocation"] == "global"
    assert abs(removed - ctx.params_to_remove) <= 2 * 64 + 1  # half the smallest block (4 channels)
    fresh = tiny_model("qwen2")
    apply_keep(fresh, ctx.adapter, res.keep)
    assert _shapes(fresh) == _shapes(model)


def test_deterministic_for_a_seed_and_keep_reproduces_weights() -> None:
    runs = []
    for _ in range(2):
        model = tiny_model("llama")
        res = get_method("bonsai")(_ctx(model, restore="none"))
        runs.append((res.keep, model))
    (keep_a, model_a), (keep_b, _) = runs
    assert {i: k.to_dict() for i, k in keep_a.items()} == {i: k.to_dict() for i, k in keep_b.items()}
    # without restoration the pruned weights are exactly the dense ones sliced by `keep`
    fresh = tiny_model("llama")
    apply_keep(fresh, adapter_for(fresh.config), keep_a)
    sd = model_a.state_dict()
    for name, t in fresh.state_dict().items():
        torch.testing.assert_close(sd[name], t, rtol=0, atol=0)


def test_regression_recovers_effects() -> None:
    g = torch.Generator().manual_seed(0)
    true = torch.tensor([0.0, 1.0, 2.0, 0.5, 3.0, 0.1])
    kept = (torch.rand(64, 6, generator=g) < 0.5).float()
    loss = 4.0 + (1 - kept) @ true + 0.01 * torch.randn(64, generator=g)
    coef = fit_importance(kept, loss, ridge=0.1)
    assert torch.argsort(coef).tolist() == torch.argsort(true).tolist()
    torch.testing.assert_close(coef.float(), true, atol=0.05, rtol=0.05)
    # more variables than samples: the dual form still ranks a dominant effect first
    kept = (torch.rand(16, 40, generator=g) < 0.5).float()
    loss = (1 - kept[:, 7]) * 5.0
    assert int(fit_importance(kept, loss, ridge=1.0).argmax()) == 7


@pytest.mark.parametrize("use_prior", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_planted_unimportant_block_is_pruned_first(use_prior: bool, seed: int) -> None:
    model = tiny_model("llama", seed=seed)
    planted = list(range(8, 12))  # block 2 of layer 1 when channels are grouped by index
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, planted] *= 1e-4
    # layer 1 only, one round removing 2 of its 24 blocks: the planted block must be one of them.
    # The loss is the KL to the dense model, >= 0 for every other block; on random tokens the NLL
    # changes to first order with either sign, which would make the test a coin toss.
    ctx = _ctx(model, attention="none", steps=1, samples=64, drop_fraction=0.25, seed=seed)
    ctx = dataclasses.replace(ctx, layers=[1], params_to_remove=8 * 3 * 64)
    res = bonsai_prune(ctx, use_prior=use_prior, loss="kl")
    # without the prior every block is a candidate; with it, the 4 lowest-prior blocks
    assert res.extra["rounds"][0]["candidates"] == (24 if not use_prior else 4)
    assert list(res.keep) == [1]
    kept = set(res.keep[1].mlp)
    assert len(kept) == 96 - 8
    assert not kept & set(planted)


def _text(path: Path, n_chars: int = 20000) -> Path:
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly", "while"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_chars // 5)))
    return path


def test_save_and_reload_same_logits(tmp_path: Path) -> None:
    model = tiny_model("qwen3")
    ctx = _ctx(model)
    get_method("bonsai")(ctx)
    save_pruned(model, ctx.adapter, tmp_path / "out")
    loaded = load_pruned(tmp_path / "out")
    ids = input_ids(batch=2, seq=16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_prune_api_with_recipe_file(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_tiny(str(model_dir), "llama")
    _text(tmp_path / "calib.txt")
    doc = {
        "version": 1,
        "model": {"id": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "n_samples": 8, "seqlen": 64, "seed": 0},
        "method": "bonsai",
        "importance": {"metric": "bonsai", "bonsai": {"samples": 8, "steps": 2, "drop_fraction": 0.1}},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"params": 0.3, "multiple_of": 4},
        "evaluate": {"enabled": False},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None)
    size = out.report["size"]
    removed = 1 - size["pruned"]["decoder_linear_params"] / size["dense"]["decoder_linear_params"]
    assert abs(removed - 0.3) < 0.05
    stage = out.report["stages"][0]
    assert stage["method"] == "bonsai" and stage["samples_per_round"] == 8 and len(stage["rounds"]) == 2
    lock = yaml.safe_load((out.output / LOCK_NAME).read_text())
    assert lock["kept"][0]
    loaded = load_pruned(out.output)
    again = prune(
        lock_path=out.output / LOCK_NAME, output=tmp_path / "again", progress=False, log=lambda s: None
    )
    assert again.reproduced is True
    ids = input_ids(batch=1, seq=16, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, load_pruned(tmp_path / "again")(ids).logits)
