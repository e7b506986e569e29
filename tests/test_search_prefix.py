"""Scoring a candidate from its first changed layer (search/prefix.py) against scoring it whole."""

from __future__ import annotations

import optuna
import pytest
import torch

from secateur.graph.adapters import adapter_for
from secateur.recipe.compile import BudgetSpec
from secateur.runtime.allocation.space import SearchSpace, project_to_budget, uniform_fractions
from secateur.search.cache import SearchCache
from secateur.search.evolution import EvolutionSampler
from secateur.search.objective import Objective
from secateur.search.prefix import PrefixCache
from secateur.search.pruner import StagePruner
from secateur.testing import tiny_model

from .conftest import input_ids

LAYERS = [0, 1, 2, 3, 4, 5]
pytestmark = pytest.mark.usefixtures("one_thread")


def _trials(objective: Objective, space: SearchSpace, n: int) -> list[tuple[str, float | None, list]]:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        sampler=EvolutionSampler(space, seed=0), pruner=StagePruner(0.25, min_peers=2)
    )
    study.enqueue_trial({s.name: 1.0 for s in space.slots}, user_attrs={"init": "uniform"})
    study.optimize(objective, n_trials=n)
    return [(t.state.name, t.value, sorted(t.intermediate_values.items())) for t in study.trials]


def test_prefix_scoring_gives_the_same_search(tmp_path) -> None:
    """Every trial's state, value and stage values are bit-identical with and without the cache,
    and the cache skips layers: children of the best run only from their first changed layer."""
    m = tiny_model("llama", num_hidden_layers=6, intermediate_size=96)
    a = adapter_for(m.config)
    held = input_ids(batch=8, seq=32, seed=1)
    cache = SearchCache.build(
        m, a, input_ids(batch=8, seq=32, seed=0), held, LAYERS, attention=False, variants_dir=str(tmp_path)
    )
    space = SearchSpace.build(m, a, BudgetSpec(fraction=0.3, multiple_of=4), LAYERS, levels=5)
    uniform = project_to_budget(uniform_fractions(space), space)
    prefix = PrefixCache(a, held, torch.float32, 1 << 30)
    runs = []
    for p in (None, prefix):
        obj = Objective(m, a, cache, space, "kl", [2, 4], batch_size=2, fixed={"uniform": uniform}, prefix=p)
        runs.append(_trials(obj, space, 14))
    assert runs[0] == runs[1]
    states = {s for s, _, _ in runs[0]}
    assert {"COMPLETE", "PRUNED"} <= states  # both the commit and the discard path ran
    windows = sum(iv[-1][0] // 31 for _, _, iv in runs[0])  # steps count scored tokens, 31 per window
    assert prefix.enabled and prefix.plan is not None
    assert prefix.layers_run < 0.9 * windows * len(LAYERS)


def test_cache_stays_off_beyond_its_memory_bound() -> None:
    m = tiny_model("llama")
    a = adapter_for(m.config)
    held = input_ids(batch=8, seq=32, seed=1)
    need = 2 * a.num_layers * held.numel() * a.hidden_size * 4
    assert PrefixCache(a, held, torch.float32, need).enabled
    off = PrefixCache(a, held, torch.float32, need - 1)
    assert not off.enabled
