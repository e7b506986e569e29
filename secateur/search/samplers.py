"""The sampler and pruner a study is opened with, from the recipe's search options."""

from __future__ import annotations

import warnings

import optuna

from secateur.recipe.allocation import SearchOptions
from secateur.runtime.allocation.space import SearchSpace
from secateur.search.errors import SearchError
from secateur.search.evolution import EvolutionSampler
from secateur.search.pruner import StagePruner
from secateur.search.speed import SpeedBudget


def make_sampler(
    options: SearchOptions,
    rank: int = 0,
    space: SearchSpace | None = None,
    speed: SpeedBudget | None = None,
) -> optuna.samplers.BaseSampler:
    """Seeded sampler; each worker gets its own seed so workers do not propose the same trials
    (the evolution sampler seeds by trial number instead, so any worker proposes the same child)."""
    seed = options.seed + 1000 * rank
    if options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if options.sampler == "nsga2":  # small generations: a 100-trial search runs several of them
        size = min(50, max(8, options.trials // 6))
        return optuna.samplers.NSGAIISampler(population_size=size, seed=seed)
    if options.sampler == "evolution":
        if space is None:
            raise SearchError("the evolution sampler needs the search space")
        return EvolutionSampler(space, seed=options.seed, speed=speed)
    if options.sampler == "cmaes":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.CmaESSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(options: SearchOptions) -> optuna.pruners.BasePruner:
    """Multi-fidelity selection: at each stage only the best `survivors` share of the recent trials
    that reached it goes on (search/pruner.py)."""
    if not options.pruner or options.objectives:
        return optuna.pruners.NopPruner()
    return StagePruner(options.survivors)
