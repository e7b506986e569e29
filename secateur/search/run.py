"""`run_search`: build the search's statistics, variants and seeds once, then run the trials in this
process and in spawned workers that share the storage, and name the winner.

Any number of processes may start on one storage at once (see `study`, `loop`); `workers` > 1
spawns processes here that each load their own model and take a share of the trials.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan, Scoring
from secateur.recipe.allocation import SearchOptions
from secateur.recipe.compile import BudgetError, BudgetSpec, uniform_plan
from secateur.runtime.allocation.plans import angular_plan
from secateur.runtime.allocation.space import (
    SearchSpace,
    level_plans,
    project_to_budget,
    uniform_fractions,
)
from secateur.runtime.allocation.variants import plan_variants
from secateur.search.cache import SearchCache
from secateur.search.errors import SearchError
from secateur.search.loop import emitter, optimize
from secateur.search.objective import Objective
from secateur.search.pareto import Cost
from secateur.search.pareto import seeds as pareto_seeds
from secateur.search.prefix import PREFIX_CACHE_BYTES, PrefixCache
from secateur.search.rescore import CompileFn, rescore
from secateur.search.speed import SpeedBudget
from secateur.search.storage import resolve_storage
from secateur.search.study import (
    SharedStudy,
    finished_count,
    open_shared,
    seed_baselines,
    space_fingerprint,
)
from secateur.search.winner import SearchResult, apply_rescore, search_result


@dataclass
class WorkerSetup:
    """Everything a worker process needs to rebuild the objective (picklable)."""

    model_factory: Callable[[], nn.Module] | None
    calib_ids: torch.Tensor
    heldout_ids: torch.Tensor
    spec: BudgetSpec
    layers: list[int]
    options: SearchOptions
    url: str | None
    study_name: str
    metric: str
    restore: str
    damping: float
    batch_size: int
    cache_kwargs: dict[str, Any] = field(default_factory=dict)
    heartbeat: tuple[int, int] = (60, 180)
    threads: int = 1
    speed: SpeedBudget | None = None


def _cache(
    setup: WorkerSetup,
    model: nn.Module,
    adapter: ModelAdapter,
    space: SearchSpace,
    emit: Callable[[str], None] | None,
) -> SearchCache:
    """Dense statistics, the dense reference and (with levels) the whole variant database, built in
    the statistics pass, layer by layer."""
    t0 = time.perf_counter()
    if emit is not None:
        emit(
            f"search: dense statistics on {setup.calib_ids.numel():,} calibration tokens and the dense "
            f"reference on {setup.heldout_ids.numel():,} held-out tokens"
        )
    # the variant database: every level of every slot, built once (reused after)
    wanted = sorted({v for p in level_plans(space) for v in plan_variants(p)}) if space.levels else []
    cache = SearchCache.build(
        model,
        adapter,
        setup.calib_ids,
        setup.heldout_ids,
        setup.layers,
        mlp=setup.spec.mlp,
        attention=setup.spec.attention != "none",
        metric=setup.metric,
        batch_size=setup.batch_size,
        restore=setup.restore,
        damping=setup.damping,
        wanted=wanted,
        progress=emit is not None,
        **setup.cache_kwargs,
    )
    if emit is not None:
        emit(f"search: statistics and reference in {time.perf_counter() - t0:.0f} s")
        if wanted:
            emit(
                f"search: variant database {cache.source.store.folder}: {len(wanted)} level variants, "
                f"{cache.source.store.built} built in {cache.build_seconds:.0f} s"
            )
    return cache


def _seeds(
    setup: WorkerSetup,
    model: nn.Module,
    adapter: ModelAdapter,
    space: SearchSpace,
    cache: SearchCache,
    uniform: Plan,
) -> tuple[dict[str, Plan], Cost | None]:
    """The seeded plans (uniform, CFSP's; Pareto mode: more budgets) and the Pareto cost."""
    cfsp = angular_plan(  # the best heuristic at the same budget: CFSP's allocation, exactly
        model,
        adapter,
        setup.spec,
        setup.layers,
        cache.angular,
        setup.metric,
        setup.restore,
        setup.damping,
    )
    fixed, cost = {"uniform": uniform, "cfsp": cfsp}, None
    kinds = setup.options.objectives
    if kinds:  # Pareto mode: seeds at several budgets, the second objective as a cost
        if kinds[1] == "latency" and setup.speed is None:
            raise SearchError("objectives: [.., latency] needs the recipe's target latency model")
        cost = Cost(kinds[1], decoder_linear_params(model, adapter), space, setup.speed)
        fixed = {"uniform": uniform, "cfsp": cfsp}
        fixed.update(
            pareto_seeds(
                model,
                adapter,
                setup.spec,
                setup.layers,
                cache.angular,
                space.goal,
                setup.metric,
                setup.restore,
                setup.damping,
            )
        )
    return fixed, cost


def _space(setup: WorkerSetup, model: nn.Module, adapter: ModelAdapter) -> SearchSpace:
    """The search space of the setup's budget, layers, scoring and options (the same in every process)."""
    o = setup.options
    return SearchSpace.build(
        model,
        adapter,
        setup.spec,
        setup.layers,
        setup.metric,
        setup.restore,
        setup.damping,
        o.knots,
        o.levels,
    )


def build_objective(
    setup: WorkerSetup,
    model: nn.Module,
    adapter: ModelAdapter,
    emit: Callable[[str], None] | None = None,
) -> tuple[SearchSpace, SearchCache, Objective]:
    """The space, the cache and the objective a process runs trials with (the same in every worker)."""
    space = _space(setup, model, adapter)
    project_to_budget(uniform_fractions(space), space)  # an infeasible budget fails here, once
    try:  # the uniform seed is exactly what the compiler would do without a search
        uniform = uniform_plan(
            model,
            adapter,
            setup.spec,
            setup.layers,
            setup.metric,
            setup.restore,
            setup.damping,
        )
    except BudgetError:
        uniform = project_to_budget(uniform_fractions(space), space)
    cache = _cache(setup, model, adapter, space, emit)
    fixed, cost = _seeds(setup, model, adapter, space, cache, uniform)
    objective = Objective(
        model,
        adapter,
        cache,
        space,
        setup.options.objective,
        stage_windows(setup.options, setup.heldout_ids),
        setup.batch_size,
        fixed,
        PrefixCache(
            adapter,
            setup.heldout_ids,
            next(model.parameters()).dtype,
            PREFIX_CACHE_BYTES,
        ),
        None if cost is not None else setup.speed,
        cost,
    )
    return space, cache, objective


def stage_windows(options: SearchOptions, heldout_ids: torch.Tensor) -> list[int]:
    """Cumulative held-out windows scored before each pruning decision (`stages` are in tokens)."""
    n, seqlen = heldout_ids.shape[0], heldout_ids.shape[1]
    if not options.pruner or n < 2 or options.objectives:
        return []
    if not options.stages:
        return [max(1, n // 4)]
    return sorted({max(1, min(n, -(-tokens // seqlen))) for tokens in options.stages} - {n})


def worker(
    setup: WorkerSetup,
    rank: int,
    n: int,
    total: int,
    fingerprint: dict[str, Any],
    progress: bool,
) -> None:
    """A spawned worker: load its own model, rebuild the cache, run its share of trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(setup.threads)
    assert setup.model_factory is not None
    model = setup.model_factory()
    adapter = adapter_for(model.config)
    space, _, objective = build_objective(setup, model, adapter)
    opened = open_shared(
        setup.url,
        setup.study_name,
        fingerprint,
        setup.options,
        rank,
        setup.heartbeat,
        space,
        setup.speed,
    )
    optimize(opened, objective, n, total, emitter(progress), prefix=f"[worker {rank}] ")


def _fingerprint(
    space: SearchSpace,
    model_fingerprint: str,
    options: SearchOptions,
    calib_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    speed: SpeedBudget | None,
) -> dict[str, Any]:
    """The study's record of what its trials depend on (a study made for another one is refused)."""
    fp = space_fingerprint(space, model_fingerprint, options.objective, calib_ids, heldout_ids)
    if options.stages or options.survivors != 0.5:
        fp["stages"] = [
            options.stages,
            options.survivors,
        ]  # studies made before stages still match
    if speed is not None:
        fp["speed"] = speed.fingerprint()
    if options.objectives:
        fp["objectives"] = list(options.objectives)
    return fp


def _run_trials(
    opened: SharedStudy,
    setup: WorkerSetup,
    model: nn.Module,
    adapter: ModelAdapter,
    fp: dict[str, Any],
    counts: tuple[int, int, int],
    progress: bool | Callable[[str], None],
) -> tuple[SearchSpace, SearchCache]:
    """Seed the study, then run `remaining` trials here and in `workers - 1` spawned processes.

    `counts` is (remaining, total, workers)."""
    remaining, total, workers = counts
    emit = emitter(progress)
    space, cache, objective = build_objective(setup, model, adapter, emit)
    with opened.lock():  # processes starting together enqueue the seeds once
        seed_baselines(opened.study, space, objective.fixed)
    shares = [remaining // workers + (r < remaining % workers) for r in range(workers)]
    procs = []
    ctx = mp.get_context("spawn")
    for rank in range(1, workers):
        if shares[rank]:
            p = ctx.Process(
                target=worker,
                args=(setup, rank, shares[rank], total, fp, bool(progress)),
                daemon=True,
            )
            p.start()
            procs.append(p)
    try:
        optimize(opened, objective, shares[0], total, emit)
    finally:
        for p in procs:
            p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise SearchError(f"{len(bad)} search worker(s) failed (exit codes {bad})")
    return space, cache


def run_search(
    model: nn.Module,
    adapter: ModelAdapter,
    calib_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    spec: BudgetSpec,
    layers: list[int],
    options: SearchOptions | None = None,
    *,
    storage: str | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    study_name: str = "secateur",
    n_trials: int | None = None,
    model_fingerprint: str = "",
    metric: str = Scoring.metric,
    restore: str = Scoring.restore,
    damping: float = Scoring.damping,
    batch_size: int = 4,
    workers: int = 1,
    model_factory: Callable[[], nn.Module] | None = None,
    progress: bool | Callable[[str], None] = True,
    cache_kwargs: dict[str, Any] | None = None,
    heartbeat: tuple[int, int] = (60, 180),
    compile_fn: CompileFn | None = None,
    speed: SpeedBudget | None = None,
) -> SearchResult:
    """Search per-layer keep fractions for `spec` on `model` (left dense) and return the best plan.

    `storage` (else options.storage) is an Optuna RDB URL or a SQLite path; by default
    `<output_dir>/search.db`. `n_trials` (else options.trials) counts finished trials in the
    study, so re-running resumes. `workers` > 1 spawns processes that each build their own
    model with `model_factory` (a picklable top-level callable) and share the storage. With
    `compile_fn` (the recipe's sequential compile) the best `options.rescore` candidates and the seeds
    are compiled and re-scored, and the best compiled one is the winner (search/rescore.py).
    """
    options = options or SearchOptions()
    total = int(n_trials if n_trials is not None else options.trials)
    url = resolve_storage(storage if storage is not None else options.storage, output_dir)
    if workers > 1 and (url is None or model_factory is None):
        raise SearchError("workers > 1 needs a storage (SQLite file or RDB URL) and a model_factory")
    setup = WorkerSetup(
        model_factory,
        calib_ids.cpu(),
        heldout_ids.cpu(),
        spec,
        list(layers),
        options,
        url,
        study_name,
        metric,
        restore,
        damping,
        batch_size,
        dict(cache_kwargs or {}),
        heartbeat,
        max(1, torch.get_num_threads() // max(workers, 1)),  # local workers share the cores
        speed,
    )
    with _quiet(setup.threads if workers > 1 else None):
        return _search(
            setup,
            model,
            adapter,
            model_fingerprint,
            total,
            workers,
            progress,
            compile_fn,
        )


@contextmanager
def _quiet(threads: int | None) -> Iterator[None]:
    """Optuna's log at WARNING and (with local workers) this process's share of the cores, restored after."""
    verbosity, before = optuna.logging.get_verbosity(), torch.get_num_threads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        torch.set_num_threads(before)


def _search(
    setup: WorkerSetup,
    model: nn.Module,
    adapter: ModelAdapter,
    model_fingerprint: str,
    total: int,
    workers: int,
    progress: bool | Callable[[str], None],
    compile_fn: CompileFn | None,
) -> SearchResult:
    """Open (or resume) the study, run the missing trials, name the winner (re-scored when compiled)."""
    options, url, speed = setup.options, setup.url, setup.speed
    space = _space(setup, model, adapter)
    fp = _fingerprint(space, model_fingerprint, options, setup.calib_ids, setup.heldout_ids, speed)
    opened = open_shared(url, setup.study_name, fp, options, 0, setup.heartbeat, space, speed)
    remaining = total - finished_count(opened.study)
    emit = emitter(progress)
    if remaining > 0:
        space, cache = _run_trials(opened, setup, model, adapter, fp, (remaining, total, workers), progress)
    elif emit is not None:
        emit(f"study {setup.study_name!r} already has {total - remaining} finished trials; nothing to run")
    result = search_result(opened.study, space, url, options, speed)
    if compile_fn is not None and options.rescore > 0 and not options.objectives:
        if remaining <= 0:
            space, cache, _ = build_objective(setup, model, adapter, emit)
        found = rescore(
            opened.study,
            model,
            cache,
            compile_fn,
            options.rescore,
            options.objective,
            setup.batch_size,
            emit,
        )
        apply_rescore(result, found)
    if remaining > 0:
        store = cache.source.store
        result.variants = {
            "folder": str(store.folder),
            "build_seconds": cache.build_seconds,
            "built": store.built,
        }
    return result
