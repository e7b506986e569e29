"""`secateur search` end to end on a tiny local model: resumable study, plots, winner recipe."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import yaml

from secateur.cli import main
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.runtime.store.io import load_pruned
from secateur.testing import tiny_search_recipe


def test_search_writes_winner_that_compiles_to_the_best_plan(tmp_path: Path, capsys) -> None:
    recipe = tiny_search_recipe(tmp_path)
    assert main(["search", str(recipe), "--trials", "3", "--quiet"]) == 0
    assert "Peak resident memory (RSS) of the process" in capsys.readouterr().out
    search_dir = tmp_path / "run" / "search"
    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{search_dir / 'search.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) == 3
    # the same command resumes the same study up to the new total
    assert main(["search", str(recipe), "--trials", "5", "--quiet"]) == 0
    study = optuna.load_study(study_name="tiny-search", storage=f"sqlite:///{search_dir / 'search.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 5
    assert (search_dir / "allocation.png").read_bytes()[:4] == b"\x89PNG"
    assert (search_dir / "history.png").is_file()
    winner = search_dir / "winner.yaml"
    assert main(["recipe", "validate", str(winner)]) == 0
    capsys.readouterr()
    assert main(["prune", str(winner), "--quiet"]) == 0
    best = json.loads((search_dir / "best_plan.json").read_text())
    model = load_pruned(tmp_path / "run" / "model")
    for i, lp in best["layers"].items():
        layer = model.model.layers[int(i)]
        if "mlp" in lp:
            assert layer.mlp.down_proj.in_features == lp["mlp"]
        if "q_per_group" in lp:
            assert layer.self_attn.q_proj.out_features == lp["q_per_group"] * 2 * 16
    removed = 1 - decoder_linear_params(model, adapter_for(model.config)) / (
        4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
    )
    assert abs(removed - 0.3) < 0.05


def test_prune_refuses_search_recipe_before_loading(tmp_path: Path, capsys) -> None:
    recipe = tiny_search_recipe(tmp_path)
    assert main(["prune", str(recipe), "--quiet"]) == 2
    assert "secateur search" in capsys.readouterr().err


def test_level_search_winner_compiles_from_the_variants_it_scored(tmp_path: Path, capsys) -> None:
    import torch

    from secateur.graph.plan import Plan
    from secateur.runtime.allocation.variant_build import prune_stitched
    from secateur.runtime.store.data import eval_windows, load_text, statistics_split, tokenize_text
    from secateur.runtime.store.loader import load_model

    recipe = tiny_search_recipe(tmp_path)
    doc = yaml.safe_load(recipe.read_text())
    db = tmp_path / "db"
    doc["allocation"] = {
        "method": "search",
        "compile": "stitched",
        "search": {
            "trials": 4,
            "heldout_tokens": 512,
            "sampler": "evolution",
            "levels": 5,
            "stages": [256],
            "survivors": 0.5,
        },
        "variants_dir": str(db),
    }
    doc["evaluate"] = {"perplexity": [{"dataset": "c.txt", "split": "test", "seqlen": 32, "max_windows": 4}]}
    recipe.write_text(yaml.safe_dump(doc))
    assert main(["search", str(recipe), "--quiet"]) == 0
    search_dir = tmp_path / "run" / "search"
    winner = yaml.safe_load((search_dir / "winner.yaml").read_text())
    assert winner["allocation"]["method"] == "table" and winner["allocation"]["compile"] == "stitched"
    stored = sorted(db.rglob("*.safetensors"))
    assert stored
    assert "winner vs uniform" in capsys.readouterr().out
    assert main(["prune", str(search_dir / "winner.yaml"), "--quiet"]) == 0
    assert sorted(db.rglob("*.safetensors")) == stored  # compiled from the stored variants only
    best = Plan.from_dict(json.loads((search_dir / "best_plan.json").read_text()))
    lm = load_model(str(tmp_path / "m"), "float32", "cpu")
    tokens = tokenize_text(lm.tokenizer, load_text("c.txt", "validation", base_dir=tmp_path))
    calib, _ = statistics_split(tokens, 8, 32, 0)
    prune_stitched(lm.model, lm.adapter, calib, best, db, progress=False)
    compiled = load_pruned(tmp_path / "run" / "model")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(compiled(ids).logits, lm.model(ids).logits)
    # the validation measured dense, the uniform allocation and this very model on the recipe's set
    from secateur.runtime.measure.evaluate import perplexity

    val = json.loads((search_dir / "validation.json").read_text())
    assert set(val) == {"dense", "uniform", "searched"}
    key = next(iter(val["searched"]["perplexity"]))
    windows = eval_windows(tokenize_text(lm.tokenizer, load_text("c.txt", "test", base_dir=tmp_path)), 32, 4)
    assert val["searched"]["perplexity"][key] == perplexity(compiled, windows, batch_size=1)
    assert val["searched"]["decoder_linear_params"] == decoder_linear_params(compiled, lm.adapter)
    assert val["uniform"]["decoder_linear_params"] != val["dense"]["decoder_linear_params"]
    assert "| searched |" in (search_dir / "validation.md").read_text()


def test_search_scores_on_windows_of_calibration_heldout_seqlen(tmp_path: Path) -> None:
    """The search's held-out KL runs on windows of calibration.heldout_seqlen tokens (the context the
    proxy sees), as many as heldout_tokens fill: 256-token windows misjudged attention cuts at 2048."""
    from secateur.recipe.load import load_recipe
    from secateur.search_cmd import search_problem

    path = tiny_search_recipe(tmp_path)
    for seqlen in (64, 128):
        recipe = load_recipe(path, [f"calibration.heldout_seqlen={seqlen}"])
        p = search_problem(recipe, tmp_path, print)
        assert tuple(p.heldout.shape) == (256 // seqlen, seqlen)
