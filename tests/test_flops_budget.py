"""budget.flops: a fraction of FLOPs per token becomes the parameter count that removes it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from secateur.api import prune
from secateur.explain import apply_plan_shapes
from secateur.graph.adapters import adapter_for
from secateur.graph.count import flops_per_token
from secateur.recipe.compile import (
    BudgetError,
    BudgetSpec,
    budget_spec,
    flops_to_params,
    plan_flops_removed,
    planned_removal,
    stage_counts,
    uniform_plan,
)
from secateur.recipe.load import recipe_from_dict
from secateur.testing import save_tiny, tiny_model


def _recipe(**over: object):
    doc: dict = {"version": 1, "model": {"id": "m"}, "budget": {"flops": 0.25, "multiple_of": 4}}
    doc.update(over)
    return recipe_from_dict(doc)


@pytest.mark.parametrize(
    "family,attention",
    [("llama", "none"), ("llama", "q_head"), ("gemma3_text", "kv_group"), ("qwen3", "v_channel")],
)
def test_planned_flops_match_the_pruned_shapes(family: str, attention: str) -> None:
    """The analytic FLOPs a plan removes equal the counter's before/after difference, sliding windows included."""
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    spec = BudgetSpec(fraction=0.3, attention=attention, multiple_of=4)
    plan = uniform_plan(model, adapter, spec, [0, 1, 2])
    pruned = copy.deepcopy(model)
    apply_plan_shapes(pruned, adapter, plan)
    for ctx in (6, 64):
        want = flops_per_token(model, adapter, ctx) - flops_per_token(pruned, adapter, ctx)
        assert plan_flops_removed(model, adapter, plan, ctx) == want


@pytest.mark.parametrize("attention", ["none", "q_head"])
def test_flops_budget_compiles_to_the_smallest_count_that_meets_it(attention: str) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    recipe = _recipe(
        targets={"attention": attention}, budget={"flops": 0.25, "multiple_of": 4, "context": 128}
    )
    (count,) = stage_counts(recipe, model, adapter)
    goal = round(0.25 * flops_per_token(model, adapter, 128))

    def removed(n: int) -> int:
        spec = BudgetSpec(count=n, attention=attention, multiple_of=4)
        return plan_flops_removed(model, adapter, uniform_plan(model, adapter, spec, [0, 1, 2]), 128)

    assert removed(count) >= goal > removed(count - 1)
    # the goal is met within one rounding step of MLP channels per layer (3 x 4 channels x 3 x 64 x 2 FLOPs)
    assert removed(count) - goal <= 3 * 4 * 3 * 64 * 2 + 2 * 64 * 128 * 2


def test_context_weighs_attention_products() -> None:
    """At a long context the dropped heads carry most of the FLOPs, so fewer parameters meet the goal."""
    model = tiny_model("llama")
    adapter = adapter_for(model.config)

    def count(context: int) -> int:
        budget = {"flops": 0.4, "multiple_of": 4, "context": context}
        return stage_counts(_recipe(targets={"attention": "q_head"}, budget=budget), model, adapter)[0]

    assert count(4096) < count(8)


def test_infeasible_flops_budget_names_key_and_limit() -> None:
    model = tiny_model("llama")
    recipe = _recipe(budget={"flops": 0.9, "min_keep": 0.5, "multiple_of": 4})
    with pytest.raises(
        BudgetError, match=r"budget.flops: removing [\d,]+ FLOPs.*min_keep=0.5.*at most about 0\.\d+"
    ):
        stage_counts(recipe, model, adapter_for(model.config))


def test_flops_budget_splits_across_passes_and_names_the_failing_pass() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    passes = [
        {"name": "sub", "method": "blockpruner", "share": 0.5, "targets": {"sublayers": True, "mlp": False}},
        {"name": "mlp", "method": "fasp", "share": 0.5, "targets": {"mlp": True}},
    ]
    recipe = _recipe(method="multipruner", passes=passes, budget={"flops": 0.2, "multiple_of": 4})
    sub, mlp = stage_counts(recipe, model, adapter)
    half = round(0.1 * flops_per_token(model, adapter, 512))
    assert sub == (half + 1) // 2  # a sublayer stage: 2 FLOPs per parameter
    plan = uniform_plan(model, adapter, BudgetSpec(count=mlp, multiple_of=4), [0, 1, 2])
    assert plan_flops_removed(model, adapter, plan, 512) == 2 * planned_removal(model, adapter, plan) >= half
    too_much = _recipe(method="multipruner", passes=passes, budget={"flops": 0.9, "multiple_of": 4})
    with pytest.raises(BudgetError, match=r"passes\.1 \(fasp\): budget.flops"):
        stage_counts(too_much, model, adapter)


def test_unresolved_latency_budget_is_refused_with_the_key() -> None:
    model = tiny_model("llama")
    with pytest.raises(BudgetError, match="budget.latency: a speed goal becomes a parameter count"):
        stage_counts(_recipe(budget={"latency": 0.3, "multiple_of": 8}), model, adapter_for(model.config))
    with pytest.raises(BudgetError, match="budget.multiple_of: auto is resolved against the serving target"):
        budget_spec(_recipe(budget={"params": 0.3}))


def test_flops_to_params_rejects_empty_targets() -> None:
    model = tiny_model("llama")
    with pytest.raises(BudgetError, match="nothing to prune"):
        flops_to_params(model, adapter_for(model.config), BudgetSpec(mlp=False), [0, 1, 2], 10, 64)


def test_prune_with_a_flops_budget_end_to_end(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    save_tiny(str(model_dir), "llama")
    (tmp_path / "calib.txt").write_text(" ".join(["the model prunes heads of a layer"] * 800))
    doc = {
        "version": 1,
        "model": {"id": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "split": "validation", "n_samples": 4, "seqlen": 32},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"flops": 0.3, "multiple_of": 4, "context": 32},
        "evaluate": {
            "perplexity": [{"dataset": "calib.txt", "split": "test", "seqlen": 32, "max_windows": 2}],
            "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = prune(path, output=tmp_path / "out", progress=False, log=lambda s: None)
    size = out.report["size"]
    cut = 1 - size["pruned"]["flops_per_token"] / size["dense"]["flops_per_token"]
    # heads are whole units: the first plan that meets the goal may overshoot by one head per group
    assert 0.3 <= cut < 0.4
    assert out.report["flops_context"] == 32
