"""The Optuna study: storage, resume, seeding with baseline allocations, workers, results.

Storage is a SQLite file by default (`<output>/search.db`) or any Optuna RDB URL. Re-running
the same command resumes: finished trials (complete or pruned) are kept and only the missing
ones run. Trials left RUNNING by a killed process are marked FAIL first: at once when they
belong to a dead process on this host (each trial records host:pid and the process start
time, so a reused pid is not mistaken for its owner), otherwise by Optuna's heartbeat once
they go stale (other machines sharing a PostgreSQL study). A study records a fingerprint of
its search space, model and data, and a different one is refused, never mixed.

Any number of processes may start on one storage at once. Schema creation, study set-up,
seeding and the admission of each trial run under one lock per storage: a file lock beside a
SQLite file, an advisory lock on PostgreSQL. A trial is created and claimed inside that lock
only while finished + running trials are fewer than the requested total, so the study ends
with exactly that many finished trials however many processes share it.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from filelock import FileLock, Timeout
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan
from secateur.recipe.compile import BudgetError, BudgetSpec, uniform_plan
from secateur.recipe.schema import SearchOptions
from secateur.runtime.allocation.plans import angular_plan
from secateur.runtime.allocation.space import (
    SearchSpace,
    level_plans,
    project_to_budget,
    uniform_fractions,
)
from secateur.runtime.allocation.variants import plan_variants
from secateur.search.cache import SearchCache
from secateur.search.evolution import EvolutionSampler, feasible
from secateur.search.objective import Objective, owner_tag
from secateur.search.pareto import Cost
from secateur.search.pareto import front as pareto_front
from secateur.search.pareto import seeds as pareto_seeds
from secateur.search.pareto import winner as pareto_winner
from secateur.search.prefix import PREFIX_CACHE_BYTES, PrefixCache
from secateur.search.pruner import StagePruner
from secateur.search.rescore import CompileFn, Rescored, rescore
from secateur.search.speed import SpeedBudget

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchError(RuntimeError):
    """A search that cannot start or continue (storage, mismatched study, no result)."""


class SearchStorageError(SearchError):
    """The storage URL cannot be opened."""


class StudyMismatchError(SearchError):
    """The stored study was created for another search space, model or data."""


@dataclass
class SearchResult:
    """The winning plan and value, one row per trial, and the live study."""

    best_plan: Plan
    best_value: float
    best_trial: int
    trials_table: list[dict[str, Any]]
    study: optuna.Study
    space: SearchSpace
    uniform_value: float | None = None
    uniform_plan: Plan | None = None
    storage: str | None = None
    variants: dict[str, Any] | None = None  # the variant database: folder, build seconds, variants built
    # the seeded allocations (uniform, cfsp): value, trial number and plan of each that completed
    seeds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # candidates compiled the way the recipe compiles and re-scored (search/rescore.py), best first
    rescored: list[dict[str, Any]] = field(default_factory=list)
    rescored_model: nn.Module | None = None  # the winner as compiled by the rescoring (when built here)
    front: list[dict[str, Any]] = field(default_factory=list)  # Pareto mode: the non-dominated points


@dataclass
class _Setup:
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


# ---- storage and study -------------------------------------------------------------------------


def resolve_storage(storage: str | None, output_dir: str | os.PathLike[str] | None) -> str | None:
    """A storage URL: the given URL, a plain path as a SQLite file, else `<output>/search.db`
    (absolute). None (in memory, not resumable) when neither is given."""
    if storage is None:
        if output_dir is None:
            return None
        out = Path(output_dir).expanduser().resolve()
        out.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{out / 'search.db'}"
    return f"sqlite:///{Path(storage).expanduser().resolve()}" if check_storage(storage) else storage


SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def check_storage(storage: str) -> bool:
    """Refuse what is neither a database URL (`dialect[+driver]://...`) nor a SQLite file path ending
    in .db/.sqlite/.sqlite3, before anything is created (True: a plain SQLite path)."""
    if "://" in storage:
        try:
            sqlalchemy.engine.make_url(storage)
        except (sqlalchemy.exc.ArgumentError, ValueError) as e:
            raise SearchStorageError(f"--storage {storage!r} is not a database URL ({e})") from e
        return False
    if Path(storage).suffix.lower() not in SQLITE_SUFFIXES:
        raise SearchStorageError(
            f"--storage {storage!r} is neither a database URL (sqlite:///FILE, postgresql://USER@HOST/DB) "
            f"nor a SQLite file path ending in {', '.join(SQLITE_SUFFIXES)}"
        )
    return True


def _sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL; None for any other storage or an in-memory database."""
    if not url.startswith("sqlite:"):
        return None
    path = url.split(":///", 1)[-1].split("?", 1)[0] if ":///" in url else ""
    return Path(path) if path and path != ":memory:" else None


def _advisory_key(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextmanager
def _pg_lock(engine: sqlalchemy.engine.Engine, name: str) -> Iterator[None]:
    """A PostgreSQL advisory lock held for one transaction (released on commit, rollback or exit)."""
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _advisory_key(name)})
        yield


@contextmanager
def _file_lock(path: Path, timeout: float = 600.0) -> Iterator[None]:
    lock = FileLock(str(path) + ".lock", timeout=timeout)
    try:
        lock.acquire()
    except Timeout as e:
        raise SearchError(f"{lock.lock_file} stayed locked for {timeout:.0f} s by another search") from e
    try:
        yield
    finally:
        lock.release()


def storage_lock(
    url: str | None, name: str = "", engine: sqlalchemy.engine.Engine | None = None
) -> AbstractContextManager[None]:
    """A lock shared by every process using the storage `url`: `<file>.lock` beside a SQLite file,
    a PostgreSQL advisory lock keyed by `name` (on `engine`, else a fresh connection), and
    nothing for an in-memory study or another database (those rely on retries alone)."""
    if url is None:
        return nullcontext()
    path = _sqlite_file(url)
    if path is not None:
        return _file_lock(path)
    if url.startswith(("postgresql", "postgres:")):
        if engine is not None:
            return _pg_lock(engine, name)
        return _pg_lock_once(url, name)
    return nullcontext()


@contextmanager
def _pg_lock_once(url: str, name: str) -> Iterator[None]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with _pg_lock(engine, name):
            yield
    finally:
        engine.dispose()


def open_storage(
    url: str, heartbeat_interval: int = 60, grace_period: int = 180
) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; SQLite waits on locks (several local workers).

    Creating Optuna's schema is not safe when several processes do it at once on a new database
    (`UNIQUE constraint failed: alembic_version`): it runs under `storage_lock`, and an
    IntegrityError from a process that does not take the lock is retried.
    """
    engine: dict[str, Any] = {}
    path = _sqlite_file(url) if url.startswith("sqlite:") else None
    if path is not None and not path.parent.is_dir():
        raise SearchStorageError(f"cannot open search storage {url!r}: folder {path.parent} does not exist")
    if url.startswith("sqlite:"):
        engine = {"connect_args": {"timeout": 60}}
    try:
        with storage_lock(url, "secateur:schema"):
            for attempt in range(3):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                        return optuna.storages.RDBStorage(
                            url,
                            engine_kwargs=engine,
                            heartbeat_interval=heartbeat_interval,
                            grace_period=grace_period,
                        )
                except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                    if attempt == 2:  # concurrent schema creation by a process outside the lock
                        raise
                    time.sleep(0.5 * (attempt + 1))
    except SearchError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SearchStorageError(f"cannot open search storage {url!r}: {first}") from e
    raise AssertionError("unreachable")


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def space_fingerprint(
    space: SearchSpace,
    model_fingerprint: str,
    objective: str,
    calib_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
) -> dict[str, Any]:
    """What must match for trials to be comparable: space, model, proxy and data."""
    fp = space.fingerprint()
    fp.update(
        model=model_fingerprint,
        objective=objective,
        calibration=[list(calib_ids.shape), _digest(calib_ids)],
        heldout=[list(heldout_ids.shape), _digest(heldout_ids)],
    )
    return json.loads(json.dumps(fp))  # canonical JSON types, as storage returns them


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22, counted from field 3 after "(comm)"


def owner_alive(owner: str, started: str | None = None) -> bool | None:
    """Whether the host:pid that ran a trial is alive; None when it ran on another host.

    `started` (the owner's start time, recorded with it) tells a reused pid from the owner:
    a container restarted after kill -9 hands out the same pids again.
    """
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None:
        now = process_start(int(pid))
        if now is not None and now != started:
            return False
    return True


def _fail(storage: optuna.storages.BaseStorage, t: FrozenTrial, reason: str) -> bool:
    try:
        storage.set_trial_user_attr(t._trial_id, "failed_because", reason)
        return storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:  # it finished (or failed) meanwhile
        return False


def fail_orphans(
    study: optuna.Study, storage: optuna.storages.BaseStorage | None, claim_wait: float = 5.0
) -> list[int]:
    """Mark FAIL the RUNNING trials no live process will finish.

    A trial records its owner (host:pid, start time) when it is created: owned by a dead local
    process -> FAIL now; never claimed within `claim_wait` seconds -> FAIL (its process died in
    between; 0 under `storage_lock`, where creating and claiming are one step); owned by another
    host -> FAIL once its heartbeat is stale.
    """
    failed: list[int] = []
    if storage is None:  # in memory: no other process can have left trials behind
        return failed
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        owner = t.user_attrs.get("owner")
        if (
            owner is not None
            and owner_alive(owner, t.user_attrs.get("owner_start")) is False
            and _fail(storage, t, "its process died")
        ):
            failed.append(t.number)
    untagged = [t for t in running if "owner" not in t.user_attrs]
    deadline = time.monotonic() + claim_wait
    while untagged and time.monotonic() < deadline:
        time.sleep(0.1)
        fresh = (storage.get_trial(t._trial_id) for t in untagged)
        untagged = [t for t in fresh if t.state == TrialState.RUNNING and "owner" not in t.user_attrs]
    for t in untagged:
        if _fail(storage, t, "no process claimed it"):
            failed.append(t.number)
    if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval():
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        failed += sorted(after - before)
    return failed


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


@dataclass
class _Opened:
    """A study with the storage it lives in and the lock its processes share."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage | None
    lock: Callable[[], AbstractContextManager[None]]


def _open(
    url: str | None,
    study_name: str,
    fingerprint: dict[str, Any],
    options: SearchOptions,
    rank: int = 0,
    heartbeat: tuple[int, int] = (60, 180),
    space: SearchSpace | None = None,
    speed: SpeedBudget | None = None,
) -> _Opened:
    storage = open_storage(url, *heartbeat) if url is not None else None
    engine = storage.engine if storage is not None else None

    def lock() -> AbstractContextManager[None]:
        return storage_lock(url, f"secateur:study:{study_name}", engine)

    with lock():  # creating the study and recording its fingerprint is one step for all processes
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=study_name,
                directions=["minimize"] * len(options.objectives or [options.objective]),
                sampler=make_sampler(options, rank, space, speed),
                pruner=make_pruner(options),
                load_if_exists=True,
            )
        except SearchError:
            raise
        except Exception as e:  # e.g. an existing multi-objective study of the same name
            raise SearchError(f"cannot open study {study_name!r} in {url}: {e}") from e
        stored = study.user_attrs.get("space")
        if stored is None:
            if study.get_trials(deepcopy=False):
                raise StudyMismatchError(
                    f"study {study_name!r} in {url} has trials but no Secateur search-space record; "
                    "use another study name or storage"
                )
            study.set_user_attr("space", fingerprint)
        elif stored != fingerprint:
            raise StudyMismatchError(
                f"study {study_name!r} in {url} was created with another recipe, model or data "
                f"(differs in: {', '.join(_diff(stored, fingerprint))}); use another study name or storage, "
                "or delete the study to start over"
            )
        fail_orphans(study, storage, claim_wait=0.0)
    return _Opened(study, storage, lock)


def open_study(
    url: str | None,
    study_name: str,
    fingerprint: dict[str, Any],
    options: SearchOptions,
    rank: int = 0,
    heartbeat: tuple[int, int] = (60, 180),
    space: SearchSpace | None = None,
) -> optuna.Study:
    """Create or load the study; refuse one made for another space; fail orphaned trials."""
    return _open(url, study_name, fingerprint, options, rank, heartbeat, space).study


def _seed(study: optuna.Study, space: SearchSpace, fixed: dict[str, Plan]) -> None:
    """Enqueue the uniform allocation and CFSP's (angular-proportional, the best heuristic) at the same
    budget unless they already ran or wait: each is scored on every stage, never pruned, and is the
    evolution's parent while no child beats it, so the winner is never worse than either on the proxy."""
    live = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING}
    present = {t.user_attrs.get("init") for t in study.get_trials(deepcopy=False) if t.state in live}
    for name, plan in fixed.items():
        if name not in present:
            study.enqueue_trial(space.params_of(space.fractions_of(plan)), user_attrs={"init": name})


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# ---- running ------------------------------------------------------------------------------------


def _emitter(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return None


def _progress_callback(kind: str, emit: Callable[[str], None], prefix: str = "") -> Callable:
    t0 = time.perf_counter()

    def cb(study: optuna.Study, t: FrozenTrial) -> None:
        if t.state == TrialState.COMPLETE and len(t.values) == 2:  # Pareto mode: both values
            shown = f"{kind}={t.values[0]:.6g} cost={t.values[1]:.4f}"
        elif t.state == TrialState.COMPLETE:
            shown = f"{kind}={t.value:.6g}"
        elif t.state == TrialState.PRUNED:
            last = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
            shown = f"pruned at {kind}={last:.6g} ({t.last_step} tokens)" if last is not None else "pruned"
        else:
            shown = t.state.name.lower()
        try:
            if len(study.directions) > 1:
                best_s = f"front={len(study.best_trials)}"
            else:
                best = study.best_trial
                best_s = f"best={best.value:.6g} (#{best.number})"
        except ValueError:
            best_s = "best=-"
        dur = t.duration.total_seconds() if t.duration is not None else float("nan")
        init = f" [{t.user_attrs['init']}]" if "init" in t.user_attrs else ""
        start = t.user_attrs.get("from_layer")
        start_s = f"  from layer {start}" if start else ""
        emit(
            f"{prefix}trial {t.number:>4}{init}  {shown}  {best_s}  "
            f"{dur:.1f} s{start_s}  ({time.perf_counter() - t0:.0f} s elapsed)"
        )

    return cb


@contextmanager
def _heartbeat(storage: optuna.storages.RDBStorage | None, trial_id: int) -> Iterator[None]:
    """Record the trial's heartbeat every interval while it runs (what Study.optimize does)."""
    interval = storage.get_heartbeat_interval() if storage is not None else None
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a busy database: the next beat retries
                pass
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _admit(opened: _Opened, total: int) -> optuna.Trial | bool:
    """Under the storage lock: a new trial claimed by this process, True when the study already
    holds `total` finished trials, False when the rest are running elsewhere (wait, then ask again)."""
    study = opened.study
    with opened.lock():
        fail_orphans(study, opened.storage, claim_wait=0.0)
        trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
        finished = sum(t.state in FINISHED for t in trials)
        if finished >= total:
            return True
        if len(trials) >= total:
            return False
        with warnings.catch_warnings():  # the heartbeat is kept by _heartbeat, as optimize would
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        trial.set_user_attr("owner", owner_tag())
        started = process_start(os.getpid())
        if started is not None:
            trial.set_user_attr("owner_start", started)
        return trial


def _optimize(
    opened: _Opened,
    objective: Objective,
    n: int,
    total: int,
    emit: Callable[[str], None] | None,
    prefix: str = "",
    poll: float = 0.2,
) -> None:
    """Run at most `n` trials, each admitted only while the study is short of `total`.

    Study.optimize with MaxTrialsCallback overshoots when several processes share a study (each
    one's last trial starts before another's completes); admission under the lock does not.
    A process whose remaining trials all run elsewhere waits for them, so that it stops only
    once the study holds `total` finished trials (or another process's trial failed and it
    takes that place).
    """
    study = opened.study
    callback = _progress_callback(objective.kind, emit, prefix) if emit is not None else None
    done = 0
    while done < n:
        trial = _admit(opened, total)
        if trial is True:
            return
        if trial is False:
            time.sleep(poll)
            continue
        value, state, err = None, None, None
        with _heartbeat(opened.storage, trial._trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (Exception, KeyboardInterrupt) as e:
                state, err = TrialState.FAIL, e
        frozen = study.tell(trial, value, state=state, skip_if_finished=True)
        if err is not None:
            raise err
        done += 1
        if callback is not None:
            callback(study, frozen)


def _build(
    setup: _Setup, model: nn.Module, adapter: ModelAdapter, emit: Callable[[str], None] | None = None
) -> tuple[SearchSpace, SearchCache, Objective]:
    space = SearchSpace.build(
        model,
        adapter,
        setup.spec,
        setup.layers,
        setup.metric,
        setup.restore,
        setup.damping,
        setup.options.knots,
        setup.options.levels,
    )
    project_to_budget(uniform_fractions(space), space)  # an infeasible budget fails here, once
    try:  # the uniform seed is exactly what the compiler would do without a search
        uniform = uniform_plan(
            model, adapter, setup.spec, setup.layers, setup.metric, setup.restore, setup.damping
        )
    except BudgetError:
        uniform = project_to_budget(uniform_fractions(space), space)
    t0 = time.perf_counter()
    if emit is not None:
        emit(
            f"search: dense statistics on {setup.calib_ids.numel():,} calibration tokens and the dense "
            f"reference on {setup.heldout_ids.numel():,} held-out tokens"
        )
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
        **setup.cache_kwargs,
    )
    if emit is not None:
        emit(f"search: statistics and reference in {time.perf_counter() - t0:.0f} s")
    if space.levels:  # the variant database: every level of every slot, built once (reused after)
        wanted = sorted({v for p in level_plans(space) for v in plan_variants(p)})
        cache.build_seconds = cache.source.build_all(wanted, progress=emit is not None)
        if emit is not None:
            emit(
                f"search: variant database {cache.source.store.folder}: {len(wanted)} level variants, "
                f"{cache.source.store.built} built in {cache.build_seconds:.0f} s"
            )
    cfsp = angular_plan(  # the best heuristic at the same budget: CFSP's allocation, exactly
        model, adapter, setup.spec, setup.layers, cache.angular, setup.metric, setup.restore, setup.damping
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
    objective = Objective(
        model,
        adapter,
        cache,
        space,
        setup.options.objective,
        stage_windows(setup.options, setup.heldout_ids),
        setup.batch_size,
        fixed,
        PrefixCache(adapter, setup.heldout_ids, next(model.parameters()).dtype, PREFIX_CACHE_BYTES),
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


def _worker(
    setup: _Setup, rank: int, n: int, total: int, fingerprint: dict[str, Any], progress: bool
) -> None:
    """A spawned worker: load its own model, rebuild the cache, run its share of trials."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(setup.threads)
    assert setup.model_factory is not None
    model = setup.model_factory()
    adapter = adapter_for(model.config)
    space, _, objective = _build(setup, model, adapter)
    opened = _open(
        setup.url, setup.study_name, fingerprint, setup.options, rank, setup.heartbeat, space, setup.speed
    )
    _optimize(opened, objective, n, total, _emitter(progress), prefix=f"[worker {rank}] ")


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, seed tag, seconds, parameters removed, fractions."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.values[0] if t.values else None,
                **({"cost": t.values[1]} if t.values and len(t.values) > 1 else {}),
                "init": t.user_attrs.get("init"),
                "seconds": t.duration.total_seconds() if t.duration is not None else None,
                "removed": t.user_attrs.get("removed"),
                **{k: round(float(v), 4) for k, v in t.params.items()},
            }
        )
    return rows


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
    metric: str = "fasp",
    restore: str = "least_squares",
    damping: float = 0.01,
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
    setup = _Setup(
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
    verbosity, threads = optuna.logging.get_verbosity(), torch.get_num_threads()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if workers > 1:
        torch.set_num_threads(setup.threads)
    try:
        space = SearchSpace.build(
            model, adapter, spec, setup.layers, metric, restore, damping, options.knots, options.levels
        )
        fp = space_fingerprint(space, model_fingerprint, options.objective, calib_ids, heldout_ids)
        if options.stages or options.survivors != 0.5:
            fp["stages"] = [options.stages, options.survivors]  # studies made before stages still match
        if speed is not None:
            fp["speed"] = speed.fingerprint()
        if options.objectives:
            fp["objectives"] = list(options.objectives)
        opened = _open(url, study_name, fp, options, 0, heartbeat, space, speed)
        study = opened.study
        remaining = total - finished_count(study)
        emit = _emitter(progress)
        if remaining > 0:
            space, cache, objective = _build(setup, model, adapter, emit)
            with opened.lock():  # processes starting together enqueue the seeds once
                _seed(study, space, objective.fixed)
            shares = [remaining // workers + (r < remaining % workers) for r in range(workers)]
            procs = []
            ctx = mp.get_context("spawn")
            for rank in range(1, workers):
                if shares[rank]:
                    p = ctx.Process(
                        target=_worker,
                        args=(setup, rank, shares[rank], total, fp, bool(progress)),
                        daemon=True,
                    )
                    p.start()
                    procs.append(p)
            try:
                _optimize(opened, objective, shares[0], total, emit)
            finally:
                for p in procs:
                    p.join()
            bad = [p.exitcode for p in procs if p.exitcode != 0]
            if bad:
                raise SearchError(f"{len(bad)} search worker(s) failed (exit codes {bad})")
        elif emit is not None:
            emit(f"study {study_name!r} already has {total - remaining} finished trials; nothing to run")
        result = _result(study, space, url, options, speed)
        if compile_fn is not None and options.rescore > 0 and not options.objectives:
            if remaining <= 0:
                space, cache, objective = _build(setup, model, adapter, emit)
            _apply_rescore(
                result,
                rescore(
                    study, model, cache, compile_fn, options.rescore, options.objective, batch_size, emit
                ),
            )
        if remaining > 0:
            store = cache.source.store
            result.variants = {
                "folder": str(store.folder),
                "build_seconds": cache.build_seconds,
                "built": store.built,
            }
        return result
    finally:
        optuna.logging.set_verbosity(verbosity)
        torch.set_num_threads(threads)


def _apply_rescore(result: SearchResult, rescored: Rescored) -> None:
    """The best compiled candidate becomes the winner; every compiled value is kept in the result."""
    top = rescored.rows[0]
    result.rescored, result.rescored_model = rescored.rows, rescored.model
    result.best_plan, result.best_value, result.best_trial = (
        Plan.from_dict(top["plan"]),
        top["value"],
        top["trial"],
    )
    for row in rescored.rows:
        if row["init"] in result.seeds:
            result.seeds[row["init"]]["compiled"] = row["value"]


def _result(
    study: optuna.Study,
    space: SearchSpace,
    url: str | None,
    options: SearchOptions | None = None,
    speed: SpeedBudget | None = None,
) -> SearchResult:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not done:
        raise SearchError(
            f"study {study.study_name!r} has no complete trial that meets its budget (all pruned, failed or too slow)"
        )
    kinds = options.objectives if options is not None else None
    if kinds:
        best = pareto_winner(study, space, speed)
    else:
        best = min(done, key=lambda t: (t.values[0], t.number))
    uniform = [t for t in done if t.user_attrs.get("init") == "uniform"]
    seeds = {
        t.user_attrs["init"]: {"value": float(t.values[0]), "trial": t.number, "plan": t.user_attrs["plan"]}
        for t in done
        if t.user_attrs.get("init")
    }
    return SearchResult(
        seeds=seeds,
        best_plan=Plan.from_dict(best.user_attrs["plan"]),
        best_value=float(best.values[0]),
        best_trial=best.number,
        trials_table=trials_table(study),
        study=study,
        space=space,
        uniform_value=float(uniform[0].values[0]) if uniform else None,
        uniform_plan=Plan.from_dict(uniform[0].user_attrs["plan"]) if uniform else None,
        storage=url,
        front=pareto_front(study, list(kinds)) if kinds else [],
    )
