"""The FASP pass end to end on tiny local models: budget, restoration, save/load, locks, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import LayerPlan, Plan
from secateur.lock import LOCK_NAME, LockError
from secateur.recipe.compile import BudgetError, BudgetSpec, planned_removal, uniform_plan
from secateur.runtime.prune.sequential import prune_sequential
from secateur.runtime.store.io import OutputExistsError, load_pruned
from secateur.testing import TINY_FAMILIES, save_tiny, tiny_model


def _text(path: Path, n_chars: int = 40000, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly", "while"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_chars // 5)))
    return path


def _recipe(tmp: Path, family: str = "llama", **over) -> Path:
    model_dir = tmp / f"model-{family}"
    if not model_dir.exists():
        save_tiny(str(model_dir), family)
    _text(tmp / "calib.txt")
    doc = {
        "version": 1,
        "name": "tiny",
        "model": {"id": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {
            "dataset": "calib.txt",
            "split": "validation",
            "n_samples": 8,
            "seqlen": 64,
            "seed": 0,
        },
        "targets": {"mlp": True, "attention": "q_head" if family != "opt" else "kv_group"},
        "budget": {"params": 0.3, "multiple_of": 4},
        "evaluate": {
            "perplexity": [{"dataset": "calib.txt", "split": "test", "seqlen": 64, "max_windows": 4}],
            "latency": {"prefill_len": 16, "decode_tokens": 4, "repeats": 1},
        },
    }
    for k, v in over.items():
        doc[k] = v
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("attention", ["none", "heads", "v_channel"])
def test_budget_reached_on_every_family(family: str, attention: str) -> None:
    if family in ("opt", "gemma2") and attention == "v_channel":
        pytest.skip("v_channel runs through Secateur's attention module (RoPE, no logit soft-capping)")
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    attn = {"none": "none", "v_channel": "v_channel"}.get(
        attention, "kv_group" if family == "opt" else "q_head"
    )
    spec = BudgetSpec(fraction=0.3, attention=attn, multiple_of=4)
    total = decoder_linear_params(model, adapter)
    plan = uniform_plan(model, adapter, spec, list(range(3)))
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    prune_sequential(model, adapter, ids, plan, batch_size=2, progress=False)
    removed = total - decoder_linear_params(model, adapter)
    assert removed == planned_removal(tiny_model(family), adapter, plan)
    # within half a multiple_of step of MLP channels (and value channels) per layer of the goal
    mlp_unit = 3 * 64 if family != "opt" else 2 * 64 + 1
    v_unit = 2 * (64 + 2 * 64) if attention == "v_channel" else 0
    assert abs(removed - 0.3 * total) <= 3 * 2 * (mlp_unit + v_unit) + 1
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize(
    "layer_plan",
    [LayerPlan(mlp=48, q_per_group=1), LayerPlan(mlp=48, v_per_group=8)],
    ids=["q_head", "v_channel"],
)
def test_restoration_lowers_reconstruction_error(layer_plan: LayerPlan) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = Plan({i: LayerPlan(**vars(layer_plan)) for i in range(3)})
    ids = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(1))
    res = prune_sequential(model, adapter, ids, plan, batch_size=4, progress=False)
    for log in res.logs:
        for err in log.errors.values():
            assert err["restored"] < err["pruned"]


def test_restoration_improves_output_vs_no_restore() -> None:
    ids = torch.randint(0, 128, (8, 48), generator=torch.Generator().manual_seed(2))
    dense = tiny_model("qwen2")
    with torch.no_grad():
        ref = dense(ids).logits
    errs = {}
    for restore in ("least_squares", "none"):
        m = tiny_model("qwen2")
        plan = Plan({i: LayerPlan(mlp=40) for i in range(3)}, restore=restore)
        prune_sequential(m, adapter_for(m.config), ids, plan, batch_size=4, progress=False)
        with torch.no_grad():
            errs[restore] = float((m(ids).logits - ref).pow(2).mean())
    assert errs["least_squares"] < errs["none"]


def test_magnitude_without_restore_runs_no_forward_and_matches_weight_ranking() -> None:
    """A weight-only plan needs no activations: no layer runs, same budget, largest-norm units."""
    model, ref = tiny_model("llama"), tiny_model("llama")
    adapter = adapter_for(model.config)
    spec = BudgetSpec(fraction=0.3, attention="q_head", multiple_of=4)
    plan = uniform_plan(model, adapter, spec, list(range(3)), metric="magnitude", restore="none")
    calls = []
    for layer in adapter.layers(model):
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    res = prune_sequential(model, adapter, torch.zeros(0, 8, dtype=torch.long), plan, progress=False)
    assert not calls and set(res.keep) == {0, 1, 2}
    assert decoder_linear_params(ref, adapter) - decoder_linear_params(model, adapter) == planned_removal(
        ref, adapter, plan
    )
    down = ref.model.layers[0].mlp.down_proj.weight
    best = down.abs().sum(0).topk(plan.layers[0].mlp).indices.sort().values
    assert res.keep[0].mlp == best.tolist()


def test_infeasible_budget_names_key_and_limit() -> None:
    model = tiny_model("llama")
    with pytest.raises(BudgetError, match=r"budget.params.*min_keep.*largest feasible budget"):
        uniform_plan(model, adapter_for(model.config), BudgetSpec(fraction=0.99, min_keep=0.5), [0, 1, 2])


@pytest.mark.parametrize("family,attention", [("llama", None), ("opt", None), ("qwen3", "v_channel")])
def test_prune_pipeline_saves_reloads_and_locks(tmp_path: Path, family: str, attention: str | None) -> None:
    recipe = _recipe(tmp_path, family)
    if attention:
        doc = yaml.safe_load(recipe.read_text())
        doc["targets"]["attention"] = attention
        recipe.write_text(yaml.safe_dump(doc))
    out = prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None)
    folder = out.output
    for name in (
        "model.safetensors",
        "config.json",
        "secateur.json",
        "recipe.yaml",
        LOCK_NAME,
        "report.json",
        "report.md",
    ):
        assert (folder / name).is_file(), name
    removed = (
        1
        - out.report["size"]["pruned"]["decoder_linear_params"]
        / out.report["size"]["dense"]["decoder_linear_params"]
    )
    assert abs(removed - 0.3) < 0.05
    loaded = load_pruned(folder)
    ids = torch.randint(0, 128, (1, 16))
    from secateur.runtime.store.loader import load_model

    lm = load_model(str(folder), dtype="float32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, lm.model(ids).logits)
    # the lock reproduces bit-identical weights
    again = prune(lock_path=folder / LOCK_NAME, output=tmp_path / "again", progress=False, log=lambda s: None)
    assert again.reproduced is True
    a = yaml.safe_load((folder / LOCK_NAME).read_text())
    assert a["kept"] and a["fingerprints"]["model"] and a["versions"]["torch"]


def test_lock_refused_for_another_model(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    out = prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None)
    lock = yaml.safe_load((out.output / LOCK_NAME).read_text())
    other = tmp_path / "other"
    save_tiny(str(other), "llama", seed=5)
    lock["recipe"]["model"]["id"] = str(other)
    (tmp_path / "other.lock.yaml").write_text(yaml.safe_dump(lock))
    with pytest.raises(LockError, match="another model"):
        prune(
            lock_path=tmp_path / "other.lock.yaml", output=tmp_path / "o2", progress=False, log=lambda s: None
        )
    assert not (tmp_path / "o2").exists()


def test_bad_input_fails_before_work(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="exists"):
        prune(recipe, output=tmp_path / "exists", progress=False)
    with pytest.raises(ValueError, match="budget.params"):
        prune(recipe, output=tmp_path / "x", overrides=["budget.params=1.5"], progress=False)
    with pytest.raises(ValueError, match="missing.txt"):
        prune(recipe, output=tmp_path / "x", overrides=["calibration.dataset=missing.txt"], progress=False)
    with pytest.raises(ValueError, match="multiple_of=512"):
        prune(recipe, output=tmp_path / "x", overrides=["budget.multiple_of=512"], progress=False)
    with pytest.raises(ValueError, match="fewer than seqlen"):
        prune(recipe, output=tmp_path / "x", overrides=["calibration.seqlen=100000"], progress=False)
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_value_channels_of_a_soft_capped_family_are_refused_before_loading(tmp_path: Path) -> None:
    """Gemma 2's attention logit soft-capping is not in Secateur's value-channel attention: the
    recipe fails in preflight, naming the key, and nothing is written."""
    r = _recipe(tmp_path, "gemma2", targets={"mlp": True, "attention": "v_channel"})
    with pytest.raises(
        BudgetError, match=r"targets.attention: 'v_channel' cannot prune gemma2: .*soft-capping"
    ):
        prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()
