"""Whether a trial's process still lives: owners recorded per trial, orphans failed, heartbeats.

Trials left RUNNING by a killed process are marked FAIL: at once when they belong to a dead
process on this host (each trial records host:pid and the process start time, so a reused pid is
not mistaken for its owner), otherwise by Optuna's heartbeat once they go stale (other machines
sharing a PostgreSQL study).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState


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


def storage_trial_id(study: optuna.Study, storage: optuna.storages.BaseStorage, number: int) -> int:
    """The storage's id of trial `number` of `study`, through the storage's public API (Optuna keeps
    its own copy in the private `FrozenTrial._trial_id`)."""
    return storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.study_name), number
    )


def _fail(study: optuna.Study, storage: optuna.storages.BaseStorage, t: FrozenTrial, reason: str) -> bool:
    trial_id = storage_trial_id(study, storage, t.number)
    try:
        storage.set_trial_user_attr(trial_id, "failed_because", reason)
        return storage.set_trial_state_values(trial_id, TrialState.FAIL)
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
            and _fail(study, storage, t, "its process died")
        ):
            failed.append(t.number)
    untagged = [t for t in running if "owner" not in t.user_attrs]
    deadline = time.monotonic() + claim_wait
    while untagged and time.monotonic() < deadline:
        time.sleep(0.1)
        waiting = {t.number for t in untagged}
        fresh = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        untagged = [t for t in fresh if t.number in waiting and "owner" not in t.user_attrs]
    for t in untagged:
        if _fail(study, storage, t, "no process claimed it"):
            failed.append(t.number)
    if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval():
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        after = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        failed += sorted(after - before)
    return failed


@contextmanager
def heartbeat(study: optuna.Study, storage: optuna.storages.RDBStorage | None, number: int) -> Iterator[None]:
    """Record trial `number`'s heartbeat every interval while it runs (what Study.optimize does)."""
    interval = storage.get_heartbeat_interval() if storage is not None else None
    if not interval:
        yield
        return
    trial_id = storage_trial_id(study, storage, number)
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
