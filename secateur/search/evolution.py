"""An EvoPress-style evolutionary sampler for Optuna (Sieberling et al., 2024).

The genome is one keep level per searched slot (`allocation.search.levels`). Each new trial is
an offspring of the best complete trial so far (elitist (1 + lambda) selection: the parent is
replaced only when a child beats it at full fidelity): its plan is snapped to levels and mutated
by 1 to `max_switches` level switches (one slot down a level, another of the same kind up one,
moving equal parameter counts), so every child removes exactly what its parent removes. The
multi-fidelity selection of EvoPress (a child scored on few tokens first, only the best scored on
more) is the study's pruner, at the stages the objective reports.

All state is read from the study's storage (trials, their plans and values), so the sampler
resumes after a kill and several processes sharing one storage evolve the same population. A
child is drawn from a generator seeded by (seed, trial number): the same trial number proposes
the same child, whichever process runs it.
"""

from __future__ import annotations

import random
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from secateur.graph.plan import Plan
from secateur.runtime.allocation.space import (
    SearchSpace,
    free_move,
    level_switch,
    nearest_levels,
    project_to_budget,
    snap_to_levels,
    uniform_fractions,
)
from secateur.search.speed import SpeedBudget


class EvolutionSampler(optuna.samplers.BaseSampler):
    """Level-switch mutations of the best complete trial; budget-neutral by construction."""

    def __init__(
        self,
        space: SearchSpace,
        seed: int = 0,
        max_switches: int = 3,
        tries: int = 16,
        speed: SpeedBudget | None = None,
    ) -> None:
        if not space.levels:
            raise ValueError("the evolution sampler needs a level space (allocation.search.levels >= 2)")
        self.space, self.seed, self.max_switches, self.tries = space, seed, max_switches, tries
        self.speed = speed  # a latency goal: free moves, kept when the predicted time meets it
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        self._proposals: dict[tuple[str, int], dict[str, float]] = {}
        self._parents: dict[int, int] = {}  # trial number -> its parent's (for the paired comparison)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        key = (study.study_name, trial.number)  # a trial number is unique within its study
        proposal = self._proposals.get(key)
        if proposal is None:
            proposal = self._proposals[key] = self.propose(study, trial.number)
        if param_name in proposal:
            return proposal[param_name]
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: list[float] | None
    ) -> None:
        self._proposals.pop((study.study_name, trial.number), None)

    def parent_of(self, number: int) -> int | None:
        """The trial number of the parent trial `number` was proposed from (None: none, or not here)."""
        return self._parents.get(number)

    def best(self, study: optuna.Study) -> FrozenTrial | None:
        """The best complete trial (a seed, e.g. CFSP's allocation, until a child beats it)."""
        done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        done = [t for t in done if "plan" in t.user_attrs and feasible(t)]
        return min(done, key=lambda t: (t.value, t.number)) if done else None

    def parent(self, study: optuna.Study) -> dict[str, int]:
        """Level genome of the best complete trial (the uniform allocation before any completes)."""
        best = self.best(study)
        if best is not None and self.speed is not None:  # no parameter goal to snap back to
            return nearest_levels(
                self.space.fractions_of(Plan.from_dict(best.user_attrs["plan"])), self.space
            )
        if best is not None:
            keeps = self.space.keeps_of(Plan.from_dict(best.user_attrs["plan"]))
        else:
            keeps = self.space.keeps_of(project_to_budget(uniform_fractions(self.space), self.space))
        return snap_to_levels(keeps, self.space)

    def mutate(self, genome: dict[str, int], rng: random.Random) -> dict[str, int]:
        """1 to `max_switches` budget-neutral level switches."""
        child = dict(genome)
        for _ in range(rng.randint(1, self.max_switches)):
            child = (
                level_switch(child, self.space, rng)
                if self.speed is None
                else free_move(child, self.space, rng)
            )
        return child

    def _repair(self, genome: dict[str, int], rng: random.Random) -> dict[str, int]:
        """Under a speed goal, a child still too slow loses one level in random slots until it fits."""
        child = dict(genome)
        slots = list(self.space.slots)
        for _ in range(sum(len(s.levels) for s in slots)):
            if self._fits(child):
                break
            s = rng.choice([s for s in slots if s.levels.index(child[s.name]) > 0] or slots)
            j = s.levels.index(child[s.name])
            child[s.name] = s.levels[max(j - 1, 0)]
        return child

    def _fits(self, genome: dict[str, int]) -> bool:
        return self.speed is None or self.speed.meets(self.space.to_plan(genome))

    def propose(self, study: optuna.Study, number: int) -> dict[str, float]:
        """A child of the current parent as per-slot keep fractions, avoiding allocations already tried."""
        rng = random.Random(self.seed * 1_000_003 + number)
        best = self.best(study)
        if best is not None:
            self._parents[number] = best.number
        parent = self.parent(study)
        seen = {tuple(sorted(t.params.items())) for t in study.get_trials(deepcopy=False) if t.params}
        child = parent
        for _ in range(self.tries):
            child = self.mutate(parent, rng)
            if self._fits(child) and tuple(sorted(self._fractions(child).items())) not in seen:
                break
        child = self._repair(child, rng)
        return self._fractions(child)

    def _fractions(self, keeps: dict[str, int]) -> dict[str, float]:
        return {s.name: keeps[s.name] / s.n for s in self.space.slots}


def feasible(t: FrozenTrial) -> bool:
    """A trial that met the speed goal it was searched under (every trial of a parameter budget)."""
    return bool(t.user_attrs.get("feasible", True))
