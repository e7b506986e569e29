"""The Optuna study: opened or resumed under the storage lock, its fingerprint, its seeds.

Re-running the same command resumes: finished trials (complete or pruned) are kept and only the
missing ones run. A study records a fingerprint of its search space, model and data, and a
different one is refused, never mixed. The parts live beside this module: `storage` (where and
the lock), `liveness` (orphaned trials, heartbeats), `samplers`, `loop` (admission of trials),
`run` (`run_search`) and `winner` (the result).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from secateur.graph.plan import Plan
from secateur.recipe.allocation import SearchOptions
from secateur.runtime.allocation.space import SearchSpace
from secateur.search.errors import SearchError, StudyMismatchError
from secateur.search.liveness import fail_orphans
from secateur.search.samplers import make_pruner, make_sampler
from secateur.search.speed import SpeedBudget
from secateur.search.storage import open_storage, storage_lock

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


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


@dataclass
class SharedStudy:
    """A study with the storage it lives in and the lock its processes share."""

    study: optuna.Study
    storage: optuna.storages.RDBStorage | None
    lock: Callable[[], AbstractContextManager[None]]


def open_shared(
    url: str | None,
    study_name: str,
    fingerprint: dict[str, Any],
    options: SearchOptions,
    rank: int = 0,
    heartbeat: tuple[int, int] = (60, 180),
    space: SearchSpace | None = None,
    speed: SpeedBudget | None = None,
) -> SharedStudy:
    """Create or load the study under the storage lock, refuse one made for another space, fail
    orphaned trials; with the storage and the lock every process of the study shares."""
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
    return SharedStudy(study, storage, lock)


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
    return open_shared(url, study_name, fingerprint, options, rank, heartbeat, space).study


def seed_baselines(study: optuna.Study, space: SearchSpace, fixed: dict[str, Plan]) -> None:
    """Enqueue the uniform allocation and CFSP's (angular-proportional, the best heuristic) at the same
    budget unless they already ran or wait: each is scored on every stage, never pruned, and is the
    evolution's parent while no child beats it, so the winner is never worse than either on the proxy."""
    live = {TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING}
    present = {t.user_attrs.get("init") for t in study.get_trials(deepcopy=False) if t.state in live}
    for name, plan in fixed.items():
        if name not in present:
            study.enqueue_trial(space.params_of(space.fractions_of(plan)), user_attrs={"init": name})


def finished_count(study: optuna.Study) -> int:
    """Trials that will not run again (complete or pruned): what `trials` counts."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))
