"""Allocation search on tiny models: projection, exact undo, storage, resume, refusal, plots."""

from __future__ import annotations

import functools
import math
import os
import random
import runpy
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from secateur.recipe.allocation import SearchOptions
from secateur.recipe.compile import BudgetError, BudgetSpec, planned_removal
from secateur.recipe.load import load_recipe
from secateur.runtime.allocation.space import (
    SearchSpace,
    angular_fractions,
    project_to_budget,
    uniform_fractions,
)
from secateur.runtime.prune.capture import capture_inputs, run_layer
from secateur.runtime.prune.sequential import select_layer
from secateur.runtime.prune.stats import collect_inputs
from secateur.search.cache import SearchCache, search_windows
from secateur.search.errors import SearchStorageError, StudyMismatchError
from secateur.search.objective import evaluate_plan, pruned, select_from_scores
from secateur.search.plots import write_plots
from secateur.search.run import run_search
from secateur.search.winner import write_winner_recipe
from secateur.testing import tiny_model

from .conftest import SEARCH_TINY, input_ids, search_model

LAYERS = [0, 1, 2, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


@pytest.fixture(scope="module")
def cached():
    torch.set_num_threads(1)
    m, a = search_model()
    cache = SearchCache.build(
        m, a, input_ids(batch=8, seq=32, seed=0), input_ids(batch=8, seq=32, seed=1), LAYERS, attention=True
    )
    return m, a, cache


# ---- projection ---------------------------------------------------------------------------------

SPECS = [
    BudgetSpec(fraction=0.2),
    BudgetSpec(fraction=0.25, attention="q_head"),
    BudgetSpec(fraction=0.3, attention="kv_group", multiple_of=4),
    BudgetSpec(fraction=0.15, min_keep=0.4, max_keep=0.9),
    BudgetSpec(count=8192, mlp=False, attention="q_head"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fraction or s.count}-{s.attention}-{s.mlp}")
def test_projection_hits_budget_within_one_step(spec):
    m, a = search_model()
    space = SearchSpace.build(m, a, spec, LAYERS)
    rng = random.Random(0)
    for seed in range(60):
        rng.seed(seed)
        fr = {n: rng.uniform(spec.min_keep, spec.max_keep) for n in space.names}
        plan = project_to_budget(fr, space)
        removed = planned_removal(m, a, plan)
        assert removed == space.removal(space.keeps_of(plan))  # same accounting as the compiler
        assert abs(removed - space.goal) <= space.step_params, (seed, removed, space.goal)
        for s in space.slots:
            k = space.keeps_of(plan)[s.name]
            assert math.ceil(spec.min_keep * s.n - 1e-9) <= k <= max(spec.max_keep * s.n, 1) + 1e-9
            if s.kind == "mlp":
                assert k % spec.multiple_of == 0 or k == s.n


def test_seed_fractions_are_in_range_and_ordered(cached):
    m, a, cache = cached
    space = SearchSpace.build(m, a, BudgetSpec(fraction=0.2), LAYERS)
    uni = uniform_fractions(space)
    assert len(set(uni.values())) == 1
    keeps = set(space.keeps_of(project_to_budget(uni, space)).values())
    assert max(keeps) - min(keeps) <= 8  # uniform up to one rounding step
    ang = angular_fractions(space, cache.angular)
    assert all(0.05 <= v <= 1.0 for v in ang.values())
    order = sorted(LAYERS, key=lambda i: cache.angular[i])
    assert ang[f"mlp_{order[0]}"] < ang[f"mlp_{order[-1]}"]  # least important block keeps least


def test_infeasible_budget_is_refused():
    m, a = search_model()
    space = SearchSpace.build(m, a, BudgetSpec(fraction=0.7, min_keep=0.5), LAYERS)
    with pytest.raises(ValueError, match="infeasible"):
        project_to_budget(uniform_fractions(space), space)


# ---- trials -------------------------------------------------------------------------------------


def test_cached_selection_matches_sequential_select_layer(cached):
    m, a, cache = cached
    space = SearchSpace.build(m, a, BudgetSpec(fraction=0.3, attention="q_head"), LAYERS)
    plan = project_to_budget(angular_fractions(space, cache.angular), space)
    inputs = capture_inputs(m, a, input_ids(batch=8, seq=32, seed=0), 8)
    hidden = inputs.hidden
    for i in LAYERS:
        p = a.layer_prefix(i)
        names = [f"{p}.{a.mlp_out}", f"{p}.{a.o}"]
        with collect_inputs({n: m.get_submodule(n) for n in names}) as stats:
            hidden = run_layer(a.layers(m)[i], hidden, inputs.kwargs[i])
        lp = plan.layers[i]
        assert select_layer(m, a, i, lp, stats, "fasp") == select_from_scores(cache, i, lp)


def test_trial_leaves_model_bit_identical(cached):
    m, a, cache = cached
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids = input_ids(batch=2, seq=16, seed=5)
    with torch.inference_mode():
        logits = m(ids).logits
    for spec in (
        BudgetSpec(fraction=0.3, attention="q_head"),
        BudgetSpec(fraction=0.3, attention="kv_group"),
    ):
        space = SearchSpace.build(m, a, spec, LAYERS)
        plan = project_to_budget(uniform_fractions(space), space)
        with pruned(m, a, cache, plan) as pm:
            assert sum(p.numel() for p in pm.parameters()) < sum(v.numel() for v in before.values())
        value = evaluate_plan(m, a, cache, plan, "kl")
        assert 0 < value < 10
        assert evaluate_plan(m, a, cache, plan, "kl") == value  # deterministic, memoised restoration
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k
    assert a.layers(m)[0].self_attn.num_key_value_groups == 2
    with torch.inference_mode():
        assert torch.equal(m(ids).logits, logits)


def test_topk_reference_bounds_full_kl(cached):
    m, a, cache = cached
    space = SearchSpace.build(m, a, BudgetSpec(fraction=0.3), LAYERS)
    plan = project_to_budget(uniform_fractions(space), space)
    full = evaluate_plan(m, a, cache, plan, "kl")
    for k in (32, 128):  # a random tiny model is nearly flat: top-32 holds a quarter of the mass
        top = SearchCache.build(
            m,
            a,
            input_ids(batch=8, seq=32, seed=0),
            input_ids(batch=8, seq=32, seed=1),
            LAYERS,
            attention=False,
            reference_mb=0,
            topk=k,
        )
        assert not top.reference.full
        approx = evaluate_plan(m, a, top, plan, "kl")
        assert 0 < approx <= full * (1 + 1e-3)  # KL of a coarsened distribution: a lower bound
    assert approx == pytest.approx(full, rel=1e-3)  # top-k of the whole vocabulary: exact


def test_search_windows_are_disjoint():
    tokens = torch.arange(10_000)
    calib, held = search_windows(tokens, 16, 64, 1024, 128)
    assert held.shape == (8, 128) and calib.shape == (16, 64)
    assert int(calib.max()) < int(held.min())


# ---- study --------------------------------------------------------------------------------------

SEARCH = textwrap.dedent(
    """
    import sys, time
    import torch
    from secateur.graph.adapters import adapter_for
    from secateur.recipe.compile import BudgetSpec
    from secateur.recipe.allocation import SearchOptions
    from secateur.testing import tiny_model

    def search(storage, n_trials, fraction=0.25, slow=0.0, **kw):
        import secateur.search.objective as obj
        from secateur.search.run import run_search
        if slow:
            orig = obj.project_to_budget
            def slow_projection(*a, **k):
                time.sleep(slow)
                return orig(*a, **k)
            obj.project_to_budget = slow_projection
        torch.set_num_threads(1)
        model = tiny_model("llama", num_hidden_layers=4, intermediate_size=96)
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, 128, (8, 32), generator=g)
        held = torch.randint(0, 128, (8, 32), generator=g)
        spec = BudgetSpec(fraction=fraction, attention="q_head")
        opts = SearchOptions(trials=n_trials, seed=0, pruner=True)
        kw.setdefault("progress", False)
        return run_search(model, adapter_for(model.config), calib, held, spec, [0, 1, 2, 3], opts,
                          storage=storage, study_name="tiny", model_fingerprint="tiny-llama-seed0",
                          **kw)

    if __name__ == "__main__":
        search(sys.argv[1], int(sys.argv[2]), slow=float(sys.argv[3]))
    """
)


@pytest.fixture()
def search_script(tmp_path: Path) -> Path:
    path = tmp_path / "search_tiny.py"
    path.write_text(SEARCH)
    return path


def test_search_writes_db_and_beats_uniform(tmp_path, search_script):
    lines: list[str] = []
    search = runpy.run_path(str(search_script))["search"]
    t0 = time.perf_counter()
    res = search(str(tmp_path / "search.db"), 6, progress=lines.append)
    per_trial = (time.perf_counter() - t0) / 6
    assert (tmp_path / "search.db").is_file()
    trials = res.study.get_trials()
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 6
    assert trials[0].user_attrs["init"] == "uniform" and trials[0].state == TrialState.COMPLETE
    assert trials[1].user_attrs["init"] == "cfsp"
    assert res.uniform_value == trials[0].value
    assert res.best_value <= res.uniform_value
    trial_lines = [s for s in lines if s.lstrip().startswith("trial")]  # plus the statistics/database phases
    assert len(res.trials_table) == 6 and len(trial_lines) == 6 and "best=" in lines[-1]
    m, a = search_model()
    assert abs(planned_removal(m, a, res.best_plan) - res.space.goal) <= res.space.step_params
    print(f"search: {per_trial:.3f} s per trial (cache build included)")

    # plots and the winner recipe
    paths = write_plots(res, tmp_path / "plots")
    assert {p.name for p in paths} == {"allocation.png", "history.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    recipe = {
        "budget": {"params": 0.25},
        "targets": {"attention": "q_head"},
        "allocation": {"method": "search"},
    }
    out = write_winner_recipe(recipe, res.best_plan, tmp_path / "win" / "recipe.yaml", res.space)
    loaded = load_recipe(out)
    assert loaded.allocation.method == "table"
    assert set(loaded.allocation.table) == {"0", "1", "2", "3"}
    assert (tmp_path / "win" / "best_plan.json").is_file()

    # the same command again: nothing left to run; another budget on the same study: refused
    again = search(str(tmp_path / "search.db"), 6)
    assert len(again.study.get_trials()) == len(trials)
    with pytest.raises(StudyMismatchError, match="was created with another recipe"):
        search(str(tmp_path / "search.db"), 6, fraction=0.3)


def test_resume_after_sigkill(tmp_path, search_script, kill_search):
    db = tmp_path / "resume.db"
    proc = subprocess.Popen(
        [sys.executable, str(search_script), str(db), "4", "0.5"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert any(s == "RUNNING" for _, s in kill_search(proc, db, 2, 60))

    res = runpy.run_path(str(search_script))["search"](str(db), 4)
    trials = res.study.get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    assert len({t.number for t in trials}) == len(trials)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    # killed after claiming its trial, or in the milliseconds between creating and claiming it
    assert len(failed) == 1
    assert failed[0].user_attrs["failed_because"] in ("its process died", "no process claimed it")
    assert sum(t.user_attrs.get("init") == "uniform" for t in finished) == 1


def test_two_workers_share_sqlite(tmp_path):
    m, a = search_model()
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (8, 32), generator=g)
    factory = functools.partial(tiny_model, "llama", **SEARCH_TINY)
    res = run_search(
        m,
        a,
        calib,
        held,
        BudgetSpec(fraction=0.2),
        LAYERS,
        SearchOptions(trials=6, sampler="random"),
        output_dir=tmp_path,
        study_name="two",
        workers=2,
        model_factory=factory,
        progress=False,
    )
    assert (tmp_path / "search.db").is_file()
    finished = [t for t in res.study.get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 6
    assert len({t.user_attrs["owner"] for t in finished}) == 2


def test_unopenable_storage_is_a_clear_error(tmp_path):
    m, a = search_model()
    ids = input_ids(batch=2, seq=16, seed=0)
    for url in (f"sqlite:///{tmp_path}/missing/dir/x.db", "nosuchdb://host/x"):
        with pytest.raises(SearchStorageError, match="cannot open search storage"):
            run_search(m, a, ids, ids, BudgetSpec(fraction=0.2), LAYERS, storage=url, progress=False)


def test_in_memory_search_without_storage():
    m, a = search_model()
    verbosity = optuna.logging.get_verbosity()
    res = run_search(
        m, a, input_ids(batch=4, seq=16, seed=0), input_ids(batch=4, seq=16, seed=1), BudgetSpec(fraction=0.2), LAYERS,
        SearchOptions(trials=3, objective="ppl"), progress=False,
    )  # fmt: skip
    assert res.storage is None and len(res.study.get_trials()) == 3
    assert res.best_value <= res.uniform_value
    assert optuna.logging.get_verbosity() == verbosity


# ---- knots: a smooth allocation over depth ------------------------------------------------------


def test_knots_interpolate_over_depth_and_round_trip():
    m, a = search_model()
    spec = BudgetSpec(fraction=0.3, attention="q_head")
    space = SearchSpace.build(m, a, spec, LAYERS, knots=3)
    assert space.param_names == ["mlp_k0", "mlp_k1", "mlp_k2", "attn_k0", "attn_k1", "attn_k2"]
    params = {"mlp_k0": 0.9, "mlp_k1": 0.5, "mlp_k2": 0.7, "attn_k0": 1.0, "attn_k1": 1.0, "attn_k2": 0.5}
    fr = space.expand(params)
    # 4 layers at depths 0, 1/3, 2/3, 1 over knots at 0, 1/2, 1
    assert fr["mlp_0"] == pytest.approx(0.9) and fr["mlp_3"] == pytest.approx(0.7)
    assert fr["mlp_1"] == pytest.approx(0.9 + (0.5 - 0.9) * 2 / 3)
    assert fr["mlp_2"] == pytest.approx(0.5 + (0.7 - 0.5) * 1 / 3)
    assert fr["attn_2"] == pytest.approx(1.0 - 0.5 / 3)
    uni = uniform_fractions(space)
    assert space.expand(space.params_of(uni)) == pytest.approx(uni)
    assert abs(planned_removal(m, a, project_to_budget(fr, space)) - space.goal) <= space.step_params
    assert space.fingerprint() != SearchSpace.build(m, a, spec, LAYERS).fingerprint()
    with pytest.raises(BudgetError, match="knots"):
        SearchSpace.build(m, a, spec, LAYERS, knots=1)


def test_search_with_knots_samples_knots_and_seeds_uniform_exactly():
    m, a = search_model()
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (8, 32), generator=g)
    res = run_search(
        m,
        a,
        calib,
        held,
        BudgetSpec(fraction=0.2),
        LAYERS,
        SearchOptions(trials=5, knots=2, pruner=False),
        progress=False,
    )
    trials = res.study.get_trials()
    assert all(set(t.params) == {"mlp_k0", "mlp_k1"} for t in trials)
    assert trials[0].user_attrs["init"] == "uniform" and res.uniform_value == trials[0].value
    uniform = res.space.fractions_of(res.uniform_plan)
    assert max(uniform.values()) - min(uniform.values()) < 0.1  # the compiler's plan, not a re-sampled one
