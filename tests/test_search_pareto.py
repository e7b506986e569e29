"""Pareto mode (issue 27): a non-dominated front whose points meet what they claim, `prune --pick`,
and resume after kill -9 with a real SQLite study and a real killed process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from optuna.trial import TrialState

from secateur.cli import main
from secateur.graph.plan import Plan
from secateur.runtime.store.io import load_pruned
from secateur.testing import tiny_search_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

SEARCH = textwrap.dedent(
    """
    import sys, time
    import torch
    from secateur.graph.adapters import adapter_for
    from secateur.recipe.compile import BudgetSpec
    from secateur.recipe.allocation import SearchOptions
    from secateur.testing import tiny_model

    def search(storage, n_trials, slow=0.0, variants=None, **kw):
        import secateur.search.objective as obj
        from secateur.search.run import run_search
        if slow:
            orig = obj.evaluate_plan
            def slow_eval(*a, **k):
                time.sleep(slow)
                return orig(*a, **k)
            obj.evaluate_plan = slow_eval
        torch.set_num_threads(1)
        model = tiny_model("llama", num_hidden_layers=4, intermediate_size=96)
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 128, (8, 32), generator=g)
        held = torch.randint(0, 128, (8, 32), generator=g)
        spec = BudgetSpec(fraction=0.3, attention="kv_group", multiple_of=4)
        opts = SearchOptions(trials=n_trials, seed=0, levels=5, objectives=["kl", "params"])
        kw.setdefault("progress", False)
        return run_search(model, adapter_for(model.config), calib, held, spec, [0, 1, 2, 3], opts,
                          storage=storage, study_name="pareto", model_fingerprint="tiny",
                          cache_kwargs={"variants_dir": variants}, **kw)

    if __name__ == "__main__":
        search(sys.argv[1], int(sys.argv[2]), slow=float(sys.argv[3]), variants=sys.argv[4])
    """
)


@pytest.fixture()
def search_script(tmp_path: Path):
    path = tmp_path / "pareto_tiny.py"
    path.write_text(SEARCH)
    import runpy

    return path, runpy.run_path(str(path))["search"]


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def test_front_is_non_dominated_and_every_point_meets_what_it_claims(tmp_path, search_script) -> None:
    from secateur.graph.adapters import adapter_for
    from secateur.recipe.compile import planned_removal
    from secateur.search.cache import SearchCache
    from secateur.search.objective import evaluate_plan
    from secateur.testing import tiny_model

    _, search = search_script
    lines: list[str] = []
    res = search(str(tmp_path / "s.db"), 16, variants=str(tmp_path / "db"), progress=lines.append)
    done = [t for t in res.study.get_trials() if t.state == TrialState.COMPLETE]
    inits = {t.user_attrs.get("init") for t in done}
    assert {"uniform", "cfsp", "uniform@0.5x", "cfsp@0.5x"} <= inits  # heuristics at several budgets
    assert res.front and len(res.front) == len(res.study.best_trials)
    values = {t.number: t.values for t in done}
    for p in res.front:  # nothing complete dominates a front point
        assert not any(_dominates(values[n], values[p["trial"]]) for n in values)
    assert any("front=" in s for s in lines)
    model = tiny_model("llama", num_hidden_layers=4, intermediate_size=96)
    a = adapter_for(model.config)
    total = 4 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96)
    g = torch.Generator().manual_seed(0)  # the script's windows: the KL each point claims, re-scored
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (8, 32), generator=g)
    cache = SearchCache.build(
        model, a, calib, held, [0, 1, 2, 3], attention=True, variants_dir=str(tmp_path / "db")
    )
    for p in res.front:
        plan = Plan.from_dict(p["plan"])
        kept = 1 - planned_removal(model, a, plan) / total
        assert p["params"] == pytest.approx(kept, abs=1e-9)
        assert p["removed_fraction"] == pytest.approx(1 - kept, abs=1e-9)
        assert evaluate_plan(model, a, cache, plan, batch_size=4) == pytest.approx(p["kl"], rel=1e-6)
    # the winner is the best front point that removes the recipe's budget
    assert res.best_trial in {p["trial"] for p in res.front}
    assert planned_removal(model, a, res.best_plan) >= res.space.goal - res.space.step_params


def test_pareto_resume_after_kill_9(tmp_path, search_script, kill_search) -> None:
    path, search = search_script
    db = tmp_path / "resume.db"
    proc = subprocess.Popen(
        [sys.executable, str(path), str(db), "10", "0.4", str(tmp_path / "db")],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert any(s == "RUNNING" for _, s in kill_search(proc, db, 3, 120))
    res = search(str(db), 10, variants=str(tmp_path / "db"))
    trials = res.study.get_trials()
    finished = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(finished) == 10 and len(res.study.directions) == 2
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["failed_because"] in (
        "its process died",
        "no process claimed it",
    )
    assert sum(t.user_attrs.get("init") == "uniform" for t in finished) == 1
    assert res.front


def _recipe(tmp: Path) -> Path:
    return tiny_search_recipe(
        tmp,
        name="tiny-pareto",
        targets={"attention": "kv_group"},
        budget={"min_keep": None},
        allocation={
            "variants_dir": str(tmp / "db"),
            "search": {"trials": 12, "heldout_tokens": 256, "levels": 5, "objectives": ["kl", "params"]},
        },
        output={"dtype": "float32"},
    )


def test_pick_compiles_the_chosen_front_point(tmp_path: Path, capsys) -> None:
    assert main(["search", str(_recipe(tmp_path)), "--quiet"]) == 0
    out = capsys.readouterr().out
    search_dir = tmp_path / "run" / "search"
    assert "Pareto front of" in out and (search_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    points = json.loads((search_dir / "front.json").read_text())["points"]
    want = sorted(p["removed_fraction"] for p in points)[len(points) // 2]
    chosen = min(
        (p for p in points if p["removed_fraction"] >= want - 1e-9), key=lambda p: (p["kl"], p["trial"])
    )
    assert main(["prune", "--pick", f"params={want}", str(search_dir), "--quiet"]) == 0
    assert f"trial {chosen['trial']}" in capsys.readouterr().out
    model = load_pruned(tmp_path / "run" / f"model-params-{want}")
    for i, lp in Plan.from_dict(chosen["plan"]).layers.items():
        layer = model.model.layers[i]
        if lp.drop_mlp:
            assert not hasattr(layer.mlp, "down_proj")
        elif lp.mlp is not None:
            assert layer.mlp.down_proj.in_features == lp.mlp
        if lp.drop_attn:
            assert not hasattr(layer.self_attn, "o_proj")
        elif lp.kv_groups is not None:
            assert layer.self_attn.k_proj.out_features == lp.kv_groups * 16
    # a point the front does not have is refused, naming what it has
    assert main(["prune", "--pick", "params=0.99", str(search_dir), "--quiet"]) != 0
    assert "no front point meets it" in capsys.readouterr().err
