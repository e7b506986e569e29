"""The trial loop of one process: admit a trial under the storage lock, run it with a heartbeat,
tell the study, print a line.

A trial is created and claimed inside the lock only while finished + running trials are fewer
than the requested total, so the study ends with exactly that many finished trials however many
processes share it.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from secateur.search.liveness import fail_orphans, heartbeat, process_start
from secateur.search.objective import Objective, owner_tag
from secateur.search.study import FINISHED, SharedStudy


def emitter(progress: bool | Callable[[str], None]) -> Callable[[str], None] | None:
    """Where progress lines go: a callable, stderr (True) or nowhere (False: None)."""
    if callable(progress):
        return progress
    if progress:
        return lambda line: print(line, file=sys.stderr, flush=True)
    return None


def progress_callback(kind: str, emit: Callable[[str], None], prefix: str = "") -> Callable:
    """An Optuna callback printing one line per finished trial (value, best so far, seconds)."""
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


def admit(opened: SharedStudy, total: int) -> optuna.Trial | bool:
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
        with warnings.catch_warnings():  # the heartbeat is kept by heartbeat(), as optimize would
            warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
            trial = study.ask()
        trial.set_user_attr("owner", owner_tag())
        started = process_start(os.getpid())
        if started is not None:
            trial.set_user_attr("owner_start", started)
        return trial


def optimize(
    opened: SharedStudy,
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
    callback = progress_callback(objective.kind, emit, prefix) if emit is not None else None
    done = 0
    while done < n:
        trial = admit(opened, total)
        if trial is True:
            return
        if trial is False:
            time.sleep(poll)
            continue
        value, state, err = None, None, None
        with heartbeat(study, opened.storage, trial.number):
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
