"""Data-driven allocations (global ranking, CFSP angular) and FLAP's bias compensation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_shapes
from secateur.graph.plan import LayerPlan, Plan
from secateur.recipe.compile import BudgetSpec, planned_removal
from secateur.runtime.allocation.dense import dense_statistics
from secateur.runtime.allocation.plans import global_plan, proportional_plan
from secateur.runtime.prune.restore import compensate_bias
from secateur.runtime.prune.sequential import prune_sequential
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.testing import save_tiny, tiny_model

IDS = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("attention", ["none", "q_head", "kv_group"])
def test_global_plan_meets_budget_and_varies_by_layer(attention: str) -> None:
    model = tiny_model("llama", num_hidden_layers=4)
    adapter = adapter_for(model.config)
    spec = BudgetSpec(fraction=0.3, attention=attention, multiple_of=1)
    dense = dense_statistics(model, adapter, IDS, [0, 1, 2, 3], True, attention != "none", batch_size=4)
    plan = global_plan(model, adapter, spec, [0, 1, 2, 3], dense, "fluctuation", "bias_compensation", 0.01)
    goal = 0.3 * decoder_linear_params(model, adapter)
    removed = planned_removal(model, adapter, plan)
    step = max(2 * 64 * 16 * 2, 3 * 64)  # the coarsest unit removed at once
    assert goal <= removed <= goal + step
    assert len({lp.mlp for lp in plan.layers.values()}) > 1  # adaptive, not uniform


def test_proportional_plan_follows_angular_importance() -> None:
    model = tiny_model("qwen3", num_hidden_layers=4)
    adapter = adapter_for(model.config)
    dense = dense_statistics(model, adapter, IDS, [0, 1, 2, 3], True, False, batch_size=4)
    spec = BudgetSpec(fraction=0.25, multiple_of=4)
    plan = proportional_plan(model, adapter, spec, [0, 1, 2, 3], dense, "fasp", "least_squares", 0.01)
    order = sorted(dense.angular, key=dense.angular.get)
    assert plan.layers[order[0]].mlp <= plan.layers[order[-1]].mlp  # least important block keeps least
    assert (
        abs(planned_removal(model, adapter, plan) - 0.25 * decoder_linear_params(model, adapter))
        <= 4 * 3 * 64
    )


def test_bias_compensation_matches_mean_contribution() -> None:
    w = torch.randn(5, 6)
    mean = torch.randn(6)
    keep = torch.tensor([0, 2, 3])
    b = compensate_bias(w, None, mean, keep)
    torch.testing.assert_close(b, w[:, [1, 4, 5]] @ mean[[1, 4, 5]])


def test_flap_adds_biases_that_save_and_reload(tmp_path: Path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    dense = dense_statistics(model, adapter, IDS, [0, 1, 2], True, True, batch_size=4)
    spec = BudgetSpec(fraction=0.3, attention="q_head", multiple_of=4)
    plan = global_plan(model, adapter, spec, [0, 1, 2], dense, "fluctuation", "bias_compensation", 0.01)
    prune_sequential(model, adapter, IDS, plan, batch_size=4, progress=False)
    assert any(model.get_submodule(f"model.layers.{i}.mlp.down_proj").bias is not None for i in plan.layers)
    with torch.no_grad():
        ref = model(IDS[:2]).logits
    save_pruned(model, adapter, tmp_path / "o")
    loaded = load_pruned(tmp_path / "o")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS[:2]).logits, ref, atol=1e-5, rtol=1e-4)


def test_bias_compensation_beats_plain_slicing() -> None:
    ids = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(4))
    dense = tiny_model("llama")
    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for restore in ("bias_compensation", "none"):
        m = tiny_model("llama")
        plan = Plan({i: LayerPlan(mlp=40) for i in range(3)}, metric="fluctuation", restore=restore)
        prune_sequential(m, adapter_for(m.config), ids, plan, batch_size=4, progress=False)
        with torch.no_grad():
            errs[restore] = float((m(ids).logits - ref).pow(2).mean())
    assert errs["bias_compensation"] < errs["none"]


@pytest.mark.parametrize(
    "method,metric,restore,alloc",
    [
        ("cfsp", "fasp", "least_squares", "uniform"),
        ("flap", "fluctuation", "bias_compensation", "uniform"),
        ("fasp", "fasp", "least_squares", "global"),
    ],
)
def test_methods_through_prune(tmp_path: Path, method: str, metric: str, restore: str, alloc: str) -> None:
    save_tiny(str(tmp_path / "m"), "qwen2", num_hidden_layers=4)
    (tmp_path / "c.txt").write_text("structured pruning keeps the useful channels. " * 500)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"id": str(tmp_path / "m"), "dtype": "float32"},
                "method": method,
                "calibration": {"dataset": "c.txt", "n_samples": 8, "seqlen": 32},
                "targets": {"mlp": True, "attention": "q_head"},
                "budget": {"params": 0.25, "multiple_of": 4},
                "importance": {"metric": metric},
                "restore": {"method": restore},
                "allocation": {"method": alloc},
                "evaluate": {"enabled": False},
            }
        )
    )
    out = prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None)
    size = out.report["size"]
    removed = 1 - size["pruned"]["decoder_linear_params"] / size["dense"]["decoder_linear_params"]
    assert 0.22 < removed < 0.32
    shapes = [
        layer_shapes(load_pruned(tmp_path / "out"), adapter_for(tiny_model("qwen2").config), i)
        for i in range(2)
    ]
    assert all(s["intermediate_size"] > 0 for s in shapes)


def test_fasp_with_proportional_allocation_is_cfsp(tmp_path: Path) -> None:
    """fasp-20.yaml (FASP, `allocation: proportional`) and cfsp-20.yaml prune the same model, so the
    quality table's CFSP row measures the README's main job."""
    save_tiny(str(tmp_path / "m"), "llama", num_hidden_layers=4)
    (tmp_path / "c.txt").write_text("structured pruning keeps the useful channels. " * 500)
    outs = []
    for method, alloc in (("fasp", {"method": "proportional"}), ("cfsp", {})):
        recipe = tmp_path / f"{method}.yaml"
        doc = {
            "model": {"id": str(tmp_path / "m"), "dtype": "float32"},
            "method": method,
            "calibration": {"dataset": "c.txt", "n_samples": 8, "seqlen": 32},
            "targets": {"mlp": True, "attention": "none"},
            "budget": {"params": 0.2, "multiple_of": 4},
            "allocation": alloc,
            "evaluate": {"enabled": False},
        }
        recipe.write_text(yaml.safe_dump(doc))
        prune(recipe, output=tmp_path / method, progress=False, log=lambda s: None)
        outs.append(load_pruned(tmp_path / method).state_dict())
    fasp, cfsp = outs
    assert fasp.keys() == cfsp.keys()
    assert any(fasp[k].shape != tiny_model("llama", num_hidden_layers=4).state_dict()[k].shape for k in fasp)
    for k in fasp:
        assert torch.equal(fasp[k], cfsp[k]), k
