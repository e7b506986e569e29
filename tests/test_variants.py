"""Variant database and level search on tiny models: stitching is exact, budgets are exact,
level switches keep the budget, the database is reused or rebuilt as its key says."""

from __future__ import annotations

import copy
import random

import optuna
import pytest
import torch

from secateur.graph.groups import layer_shapes
from secateur.graph.plan import Plan
from secateur.recipe.compile import BudgetSpec, planned_removal
from secateur.runtime.allocation.dense import dense_statistics
from secateur.runtime.allocation.space import (
    SearchSpace,
    level_switch,
    project_to_budget,
    snap_to_levels,
)
from secateur.runtime.allocation.variant_build import build_variants, prune_stitched
from secateur.runtime.allocation.variants import (
    VariantStore,
    layer_stats,
    plan_variants,
    store_key,
)
from secateur.runtime.prune.select import by_score, select_units
from secateur.runtime.prune.sequential import restore_layer, write_consumers
from secateur.runtime.prune.surgery import apply_keep
from secateur.search.cache import SearchCache
from secateur.search.evolution import EvolutionSampler
from secateur.search.objective import pruned

from .conftest import input_ids, search_model

LAYERS = [0, 1, 2, 3]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread


CALIB, HELDOUT, PROBE = (
    input_ids(batch=8, seq=32, seed=0),
    input_ids(batch=4, seq=32, seed=1),
    input_ids(batch=2, seq=16, seed=2),
)


def _space(m, a, attention: str = "kv_group", fraction: float = 0.3, levels: int = 5) -> SearchSpace:
    spec = BudgetSpec(fraction=fraction, attention=attention, multiple_of=4)
    return SearchSpace.build(m, a, spec, LAYERS, levels=levels)


def _random_plan(space: SearchSpace, rng: random.Random) -> Plan:
    return project_to_budget({n: rng.random() for n in space.names}, space)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    m, a = search_model()
    root = tmp_path_factory.mktemp("variants")
    cache = SearchCache.build(m, a, CALIB, HELDOUT, LAYERS, attention=True, variants_dir=str(root))
    return m, a, cache, root


def _direct(m, a, plan: Plan) -> torch.nn.Module:
    """The model pruned to `plan` in one shot from dense statistics, without the database."""
    m = copy.deepcopy(m)
    dense = dense_statistics(m, a, CALIB, LAYERS, True, True, 8)
    for i, lp in sorted(plan.layers.items()):
        ls = layer_stats(m, a, i, dense.stats[i], plan.metric)
        lk = select_units(lp, ls.n_units, by_score(lambda k, ls=ls: ls.scores[k]))
        weights, _ = restore_layer(m, a, i, lk, ls.stats, plan.damping, plan.restore, errors=False)
        apply_keep(m, a, {i: lk})
        with torch.no_grad():
            write_consumers(m, weights)
    return m


@torch.inference_mode()
def _logits(m) -> torch.Tensor:
    return m(PROBE, use_cache=False).logits


@pytest.mark.parametrize("attention", ["kv_group", "q_head"])
def test_stitched_candidate_equals_direct_pruning_and_the_stitched_compile(setup, attention):
    m, a, cache, root = setup
    space = _space(m, a, attention)
    rng = random.Random(0)
    plans = [_random_plan(space, rng) for _ in range(3)]
    plans.append(space.to_plan({s.name: s.levels[0] for s in space.slots[:2]} | space.keeps_of(plans[0])))
    dense = _logits(m)
    for plan in plans:
        with pruned(m, a, cache, plan) as cand:
            got = _logits(cand)
        assert torch.equal(_logits(m), dense)  # undone exactly
        assert torch.allclose(got, _logits(_direct(m, a, plan)), atol=1e-5, rtol=0)
        compiled = copy.deepcopy(m)
        res = prune_stitched(compiled, a, CALIB, plan, root, progress=False)
        assert torch.equal(_logits(compiled), got)  # the compiled winner is the evaluated candidate
        assert res.extra["variants"]["built"] == 0  # every variant came from the database


def test_removed_level_drops_the_branch(setup):
    m, a, cache, _ = setup
    space = _space(m, a)
    keeps = {s.name: s.n for s in space.slots}
    mlp0 = next(s for s in space.slots if s.kind == "mlp")
    keeps[mlp0.name] = 0
    plan = space.to_plan(keeps)
    assert plan.layers[mlp0.layer].drop_mlp
    assert planned_removal(m, a, plan) == space.removal(keeps) == mlp0.n * mlp0.unit_params
    dense = _logits(m)
    with pruned(m, a, cache, plan) as cand:
        assert layer_shapes(cand, a, mlp0.layer)["skip_mlp"]
        assert not torch.allclose(_logits(cand), dense)
    assert not layer_shapes(m, a, mlp0.layer)["skip_mlp"]


@pytest.mark.parametrize("attention", ["none", "kv_group", "q_head"])
@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.5])
def test_budget_is_exact_for_random_candidates(attention, fraction):
    m, a = search_model()
    space = _space(m, a, attention, fraction, levels=9)
    rng = random.Random(1)
    for _ in range(30):
        plan = _random_plan(space, rng)
        removed = planned_removal(m, a, plan)
        assert abs(removed - space.goal) <= space.step_params / 2
        assert removed == space.removal(space.keeps_of(plan))


@pytest.mark.parametrize("attention", ["none", "kv_group"])
def test_level_switches_keep_the_budget(attention):
    m, a = search_model()
    space = _space(m, a, attention, 0.3, levels=9)
    rng = random.Random(2)
    genome = snap_to_levels(space.keeps_of(_random_plan(space, rng)), space)
    base = space.removal(genome)
    moved = 0
    for _ in range(50):
        child = level_switch(genome, space, rng)
        assert space.removal(child) == base
        assert all(child[s.name] in s.levels for s in space.slots)
        moved += child != genome
        genome = child
    assert moved > 40
    # a genome on levels is projected onto itself plus at most a fine fix-up of the remainder
    plan = project_to_budget({s.name: genome[s.name] / s.n for s in space.slots}, space)
    keeps = space.keeps_of(plan)
    off = [s.name for s in space.slots if keeps[s.name] != genome[s.name]]
    assert abs(space.removal(keeps) - space.goal) <= space.step_params / 2
    assert len(off) <= 2


def test_evolution_sampler_children_keep_the_parents_budget():
    m, a = search_model()
    space = _space(m, a, "kv_group", 0.3, levels=9)
    sampler = EvolutionSampler(space, seed=0)
    study = optuna.create_study(sampler=sampler)
    parent_plan = project_to_budget({n: 0.7 for n in space.names}, space)
    parent = snap_to_levels(space.keeps_of(parent_plan), space)
    study.add_trial(
        optuna.trial.create_trial(
            params={n: 0.7 for n in space.names},
            distributions={n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in space.names},
            value=1.0,
            user_attrs={"plan": parent_plan.to_dict()},
        )
    )
    for number in range(1, 8):
        child = sampler.propose(study, number)
        keeps = {s.name: round(child[s.name] * s.n) for s in space.slots}
        assert space.removal(keeps) == space.removal(parent)
        assert keeps != parent
    assert sampler.propose(study, 3) == sampler.propose(study, 3)  # same trial number, same child


def test_database_is_reused_and_rebuilt_when_its_key_changes(tmp_path):
    m, a = search_model()
    space = _space(m, a)
    plan = project_to_budget({n: 0.6 for n in space.names}, space)
    wanted = plan_variants(plan)

    def build(calib=CALIB, damping=0.01, model=m):
        store = VariantStore(tmp_path, store_key(model, calib, "fasp", "least_squares", damping))
        scoring = ("fasp", "least_squares", damping)
        build_variants(model, a, store, calib, wanted, LAYERS, True, True, scoring, progress=False)
        return store

    first = build()
    assert first.built == len(wanted)
    stamps = {p: p.stat().st_mtime_ns for p in first.folder.glob("*.safetensors")}
    again = build()
    assert again.folder == first.folder and again.built == 0
    assert {p: p.stat().st_mtime_ns for p in again.folder.glob("*.safetensors")} == stamps
    for changed in (build(damping=0.05), build(calib=input_ids(batch=8, seq=32, seed=9))):
        assert changed.folder != first.folder and changed.built == len(wanted)
    other = copy.deepcopy(m)
    with torch.no_grad():
        a.layers(other)[0].mlp.up_proj.weight.mul_(1.01)
    assert build(model=other).built == len(wanted)
    assert not list(tmp_path.rglob("*.tmp.*"))  # written, then renamed: no temporary leftovers


def test_evolution_search_scores_in_stages_and_keeps_the_budget(setup):
    from optuna.trial import TrialState

    from secateur.recipe.allocation import SearchOptions
    from secateur.search.run import run_search

    m, a, _, root = setup
    spec = BudgetSpec(fraction=0.3, attention="kv_group", multiple_of=4)
    opts = SearchOptions(
        trials=12, sampler="evolution", levels=5, heldout_tokens=128, stages=[64], survivors=0.1
    )
    res = run_search(
        m, a, CALIB, HELDOUT, spec, LAYERS, opts, progress=False, cache_kwargs={"variants_dir": str(root)}
    )
    trials = res.study.get_trials()
    assert len([t for t in trials if t.state.is_finished()]) == 12
    first, full = 2 * 31, 4 * 31  # tokens scored after the first stage (2 of 4 windows) and in all
    for t in trials:
        steps = sorted(t.intermediate_values)
        assert steps == ([first] if t.state == TrialState.PRUNED else [first, full])
        assert abs(t.user_attrs["removed"] - res.space.goal) <= res.space.step_params / 2
    assert any(t.state == TrialState.PRUNED for t in trials)
    children = [t for t in trials if "init" not in t.user_attrs]
    assert len({tuple(sorted(t.params.items())) for t in children}) == len(children)  # no repeats


def test_winner_table_with_a_removed_branch_compiles_to_the_same_plan(tmp_path):
    import yaml

    from secateur.recipe.compile import allocate, table_fractions
    from secateur.recipe.load import load_recipe
    from secateur.search.winner import write_winner_recipe

    m, a = search_model()
    space = _space(m, a, "none", 0.3, levels=5)
    keeps = space.keeps_of(project_to_budget({n: 0.7 for n in space.names}, space))
    keeps[space.slots[1].name] = 0
    plan = space.to_plan(keeps)
    base = yaml.safe_load(open("recipes_examples/search-30.yaml"))
    base["budget"]["multiple_of"] = 4
    path = write_winner_recipe(base, plan, tmp_path / "winner.yaml", space)
    recipe = load_recipe(path)
    assert recipe.allocation.compile == "stitched"
    fixed = table_fractions(recipe.allocation.table, a.num_layers)
    got = allocate(m, a, space.spec, LAYERS, fixed)
    assert {i: lp for i, lp in got.layers.items()} == plan.layers
