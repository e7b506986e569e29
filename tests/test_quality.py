"""The quality engine: error-correcting restoration and OBS selection, exact on constructed cases."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.plan import LayerPlan, Plan
from secateur.lock import LOCK_NAME
from secateur.recipe.errors import RecipeError
from secateur.recipe.load import load_recipe
from secateur.runtime.prune.obs import obs_remove, obs_remove_channels
from secateur.runtime.prune.restore import relative_error, restore_columns, restore_toward
from secateur.runtime.prune.select import top_units
from secateur.runtime.prune.sequential import prune_sequential
from secateur.testing import save_tiny, tiny_model

GEN = torch.Generator().manual_seed(0)


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x


def test_error_correction_with_no_upstream_error_and_nothing_pruned_returns_w() -> None:
    w = torch.randn(6, 10, generator=GEN)
    x = torch.randn(200, 10, generator=GEN)
    g = _gram(x)
    res = restore_toward(w, g, g, float(((w @ g) * w).sum()), torch.arange(10))
    assert torch.allclose(res.weight, w, atol=1e-5)
    assert res.err_restored == pytest.approx(0.0, abs=1e-5)


def test_error_correction_equals_plain_restoration_when_the_streams_agree() -> None:
    w = torch.randn(6, 10, generator=GEN)
    g = _gram(torch.randn(200, 10, generator=GEN))
    keep = torch.tensor([0, 2, 3, 5, 7, 9])
    plain = restore_columns(w, g, keep)
    corrected = restore_toward(w, g, g, float(((w @ g) * w).sum()), keep)
    assert torch.allclose(plain.weight, corrected.weight, atol=1e-4)


def test_error_correction_beats_plain_restoration_under_upstream_error() -> None:
    w = torch.randn(6, 10, generator=GEN)
    x_dense = torch.randn(400, 10, generator=GEN)
    # the pruned stream's inputs: a systematic distortion left by earlier layers, plus noise
    mix = torch.eye(10) + 0.3 * torch.randn(10, 10, generator=GEN)
    x = x_dense @ mix + 0.05 * torch.randn(400, 10, generator=GEN)
    keep = torch.tensor([0, 1, 2, 4, 6, 8, 9])
    target = x_dense @ w.T

    def err(w_new: torch.Tensor) -> float:
        return float((x[:, keep] @ w_new.T - target).square().sum() / target.square().sum())

    plain = restore_columns(w, _gram(x), keep)
    corrected = restore_toward(w, _gram(x), x_dense.T @ x, float(target.square().sum()), keep)
    assert err(corrected.weight) < 0.5 * err(plain.weight)
    assert corrected.err_restored == pytest.approx(err(corrected.weight), rel=1e-3, abs=1e-6)


def _redundant_inputs() -> torch.Tensor:
    """Columns 1 and 3 carry the same signal; every column is strong, so scores keep both."""
    x = torch.randn(500, 8, generator=GEN)
    x[:, 3] = x[:, 1]
    x[:, [1, 3]] *= 3.0
    return x


def test_obs_removes_the_channel_a_duplicate_makes_redundant() -> None:
    x = _redundant_inputs()
    w = torch.randn(5, 8, generator=GEN)
    kept = obs_remove_channels(w, _gram(x), n_keep=7, damping=1e-4)
    assert len(kept) == 7 and (1 not in kept or 3 not in kept)
    # the fixed FASP score keeps both duplicates (they have the largest activation norms)
    score = w.abs().sum(0) * x.norm(dim=0)
    assert {1, 3} <= set(top_units(score, 7))


def test_obs_on_head_units_removes_the_redundant_head() -> None:
    x = torch.randn(500, 8, generator=GEN)
    x[:, 4:6] = x[:, 0:2]  # head 2 (columns 4-5) repeats head 0 (columns 0-1)
    x[:, 0:2] *= 2.0
    x[:, 4:6] *= 2.0
    w = torch.randn(5, 8, generator=GEN)
    units = [[0, 1], [2, 3], [4, 5], [6, 7]]
    kept = obs_remove(w, _gram(x), units, n_keep=3, damping=1e-4)
    assert len(kept) == 3 and (0 not in kept or 2 not in kept)
    # with partitions (two KV groups of two heads) each group keeps one head: the duplicated pair
    # (0, 2) sits in different groups, so exactly one of them goes (once it has, the other is unique)
    kept = obs_remove(w, _gram(x), units, n_keep=1, partitions=2, damping=1e-4)
    assert kept[0] in (0, 1) and kept[1] in (2, 3) and len({0, 2} & set(kept)) == 1


def test_obs_channels_match_the_generic_grouped_rule() -> None:
    x = torch.randn(300, 12, generator=GEN)
    w = torch.randn(4, 12, generator=GEN)
    g = _gram(x)
    assert obs_remove_channels(w, g, 7) == obs_remove(w, g, [[j] for j in range(12)], 7)


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_sequential_pass_with_obs_and_error_correction(family: str) -> None:
    model = tiny_model(family).eval()
    adapter = adapter_for(model.config)
    attn = {"kv_groups": 1} if family == "opt" else {"q_per_group": 1}
    plan = Plan({0: LayerPlan(mlp=48), 1: LayerPlan(mlp=40, **attn), 2: LayerPlan(mlp=56)})
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense_logits = model(ids).logits
    results = {}
    for selection in ("score", "obs"):
        for ec in (False, True):
            m = tiny_model(family).eval()
            p = Plan(dict(plan.layers), selection=selection, error_correction=ec)
            prune_sequential(m, adapter, ids, p, batch_size=4, progress=False)
            with torch.no_grad():
                results[(selection, ec)] = float((m(ids).logits - dense_logits).square().mean())
    # every variant prunes the same widths and stays finite; error correction does not hurt here
    assert all(torch.isfinite(torch.tensor(v)) for v in results.values())
    assert results[("score", True)] <= results[("score", False)] * 1.05
    assert results[("obs", True)] <= results[("obs", False)] * 1.05


def test_error_correction_matches_plain_when_only_the_first_layer_is_pruned() -> None:
    """Before the first pruned layer both streams are the same, so both restorations agree there."""
    ids = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    out = []
    for ec in (False, True):
        m = tiny_model("llama").eval()
        prune_sequential(
            m, adapter_for(m.config), ids, Plan({0: LayerPlan(mlp=40)}, error_correction=ec), progress=False
        )
        out.append(m.model.layers[0].mlp.down_proj.weight.detach().clone())
    assert torch.allclose(out[0], out[1], atol=1e-5)


def _recipe(tmp: Path, **over) -> Path:
    save_tiny(str(tmp / "model"), "llama")
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer"]
    (tmp / "calib.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    doc = {
        "model": {"id": str(tmp / "model"), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "n_samples": 4, "seqlen": 32, "heldout_windows": 2},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"params": 0.25, "multiple_of": 4},
        "importance": {"metric": "fasp", "selection": "obs"},
        "restore": {
            "method": "least_squares",
            "error_correction": 0.5,
            "refine_steps": 6,
            "refine_lr": 1e-3,
        },
        "evaluate": {"enabled": False},
        **over,
    }
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_options_are_locked_explained_and_reproduced(tmp_path: Path, capsys) -> None:
    from secateur.cli import main

    r = _recipe(tmp_path)
    out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    plan = out.lock["plans"][0]
    assert plan["selection"] == "obs" and plan["error_correction"] == 0.5 and plan["refine_steps"] == 6
    again = prune(
        lock_path=tmp_path / "out" / LOCK_NAME, output=tmp_path / "again", progress=False, log=lambda s: None
    )
    assert again.reproduced is True
    assert main(["recipe", "explain", str(r)]) == 0
    text = capsys.readouterr().out
    assert "selection obs" in text and "error correction" in text


@pytest.mark.parametrize(
    "over,key",
    [
        (
            {"method": "bonsai", "importance": {"metric": "bonsai", "selection": "obs"}},
            "importance.selection",
        ),
        (
            {
                "restore": {"method": "bias_compensation", "error_correction": 1.0},
                "method": "flap",
                "importance": {"metric": "fluctuation"},
            },
            "restore.error_correction",
        ),
        ({"importance": {"selection": "optimal"}}, "importance.selection"),
        (
            {"method": "blockpruner", "targets": {"sublayers": True}, "restore": {"refine_steps": 5}},
            "restore.refine_steps",
        ),
    ],
)
def test_options_validated(tmp_path: Path, over: dict, key: str) -> None:
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        load_recipe(_recipe(tmp_path, **over))


@pytest.mark.parametrize("ec", [False, True])
def test_refinement_never_worsens_the_held_out_branch_error(ec: bool) -> None:
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(3))
    m = tiny_model("llama").eval()
    plan = Plan(
        {i: LayerPlan(mlp=32) for i in range(3)}, error_correction=ec, refine_steps=40, refine_lr=1e-3
    )
    res = prune_sequential(m, adapter_for(m.config), ids, plan, batch_size=2, progress=False)
    refined = [log.errors["refine"] for log in res.logs if "refine" in log.errors]
    assert len(refined) == 3
    assert all(r["restored"] <= r["pruned"] for r in refined)
    assert any(r["restored"] < r["pruned"] and r["steps"] > 0 for r in refined)  # it does move
    assert "refine" in res.phases


def test_refine_branch_fits_a_target_branch() -> None:
    from secateur.runtime.prune.refine import refine_branch

    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)
    xs = [torch.randn(64, 8) for _ in range(10)]
    with torch.no_grad():
        ys = [teacher(x) for x in xs]
    out = refine_branch(student, xs, ys, steps=300, lr=1e-2)
    assert out["heldout_after"] < 0.2 * out["heldout_before"]


def test_error_correction_strength_interpolates_between_plain_and_dense_targets() -> None:
    w = torch.randn(6, 10, generator=GEN)
    x_dense = torch.randn(300, 10, generator=GEN)
    x = x_dense + 0.3 * torch.randn(300, 10, generator=GEN)
    keep = torch.tensor([0, 1, 3, 4, 6, 8])
    g, c, e = _gram(x), x_dense.T @ x, float((x_dense @ w.T).square().sum())
    plain = restore_columns(w, g, keep).weight
    assert torch.allclose(restore_toward(w, g, c, e, keep, strength=0.0).weight, plain, atol=1e-4)
    half = restore_toward(w, g, c, e, keep, strength=0.5).weight
    full = restore_toward(w, g, c, e, keep).weight
    assert torch.allclose(half, (plain + full) / 2, atol=1e-4)  # the solve is linear in the target
    # its logged error is against the blended target W (x_dense + x) / 2
    target = ((x_dense + x) / 2) @ w.T
    err = float((x[:, keep] @ half.T - target).square().sum() / target.square().sum())
    assert restore_toward(w, g, c, e, keep, strength=0.5).err_restored == pytest.approx(err, rel=1e-3)


@pytest.mark.parametrize("dead", [0, 5])
def test_restoration_errors_from_gram_blocks_equal_the_whole_gram_formula(dead: int) -> None:
    """The errors come from blocks of G (no product with the whole Gram): they must equal
    ||(W - W') X||^2 / ||W X||^2 computed from all of G, also for a rank-deficient G."""
    torch.manual_seed(1)
    x = torch.randn(300, 120, dtype=torch.float64) * (1 + 3 * torch.rand(120, dtype=torch.float64))
    x[:, :dead] = 0
    g = (x.T @ x).float()
    w = torch.randn(24, 120) * 0.1
    keep = torch.randperm(120)[:80].sort().values
    res = restore_columns(w, g, keep)
    full = torch.zeros_like(w)
    full[:, keep] = res.weight
    sliced = torch.zeros_like(w)
    sliced[:, keep] = w[:, keep]
    assert res.err_pruned == pytest.approx(relative_error(w.double(), sliced.double(), g.double()), rel=1e-4)
    assert res.err_restored == pytest.approx(relative_error(w.double(), full.double(), g.double()), rel=1e-3)
    assert res.err_restored < res.err_pruned
