"""`secateur search` under real failure modes: several processes on one new SQLite file,
`--workers` from the command line, kill -9 then the same command again, no matplotlib.

Everything runs as real subprocesses on real SQLite files (the `search_cli` fixture in
conftest.py); nothing in the search is mocked. Processes are lined up to open the storage at
the same moment by a wrapper around `open_storage`, and matplotlib is removed by a meta-path
blocker installed before the CLI starts.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from secateur.search.liveness import owner_alive, process_start

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _study(search_dir: Path, name: str = "tiny-search") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{search_dir / 'search.db'}")


def _assert_exact(study: optuna.Study, total: int) -> list[optuna.trial.FrozenTrial]:
    """`total` finished trials, none left running or waiting, each number once, one of each seed."""
    trials = study.get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == total, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.number for t in trials}) == len(trials)
    for seed in ("uniform", "cfsp"):
        assert sum(t.user_attrs.get("init") == seed for t in finished) == 1
    return finished


def test_processes_started_together_on_a_new_sqlite_file(search_cli) -> None:
    recipe = search_cli.recipe(trials=6)
    barrier = (search_cli.root / "barrier", 2)
    procs = [search_cli.start(str(recipe), "--quiet", tag=str(i), barrier=barrier) for i in range(2)]
    for p in procs:
        rc, out, err = search_cli.finish(p)
        assert rc == 0, err[-3000:]
        assert "winner recipe:" in out
    assert len(os.listdir(barrier[0])) == 2  # both reached the storage before either opened it
    finished = _assert_exact(_study(search_cli.search_dir), 6)
    assert all(t.state == TrialState.COMPLETE for t in finished)


def test_workers_from_the_cli_on_sqlite(search_cli) -> None:
    recipe = search_cli.recipe(trials=6)
    rc, out, err = search_cli.finish(search_cli.start(str(recipe), "--workers", "2"))
    assert rc == 0, err[-3000:]
    assert "[worker 1] trial" in err
    finished = _assert_exact(_study(search_cli.search_dir), 6)
    assert len({t.user_attrs["owner"] for t in finished}) == 2
    assert (search_cli.search_dir / "winner.yaml").is_file()


def _states(db: Path) -> list[str]:
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return [s for (s,) in con.execute("SELECT state FROM trials")]
    except sqlite3.OperationalError:  # tables not created yet
        return []


EVOLUTION = {"sampler": "evolution", "levels": 5, "pruner": True, "heldout_tokens": 512, "stages": [256]}


@pytest.mark.parametrize("search", [{}, EVOLUTION], ids=["random", "evolution"])
def test_kill_9_then_the_same_command_counts_every_trial_once(search_cli, search) -> None:
    recipe = search_cli.recipe(trials=12, **search)
    db = search_cli.search_dir / "search.db"
    proc = search_cli.start(str(recipe), "--quiet", tag="killed")
    try:
        deadline = time.monotonic() + 90
        while sum(s == "COMPLETE" for s in _states(db)) < 3:
            assert proc.poll() is None, "the search stopped before it could be killed"
            assert time.monotonic() < deadline, "the search did not finish three trials in time"
            time.sleep(0.01)
        time.sleep(random.uniform(0, 0.2))  # anywhere: inside a trial, between two, under the lock
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _states(db)
    assert 3 <= before.count("COMPLETE") < 12

    rc, out, err = search_cli.finish(search_cli.start(str(recipe), "--quiet", tag="again"))
    assert rc == 0, err[-3000:]
    trials = _study(search_cli.search_dir).get_trials()
    _assert_exact(_study(search_cli.search_dir), 12)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == before.count("RUNNING") <= 1  # the trial the kill interrupted, if any
    # killed inside the trial, or between creating and claiming it (both under the storage lock)
    assert all(
        t.user_attrs["failed_because"] in ("its process died", "no process claimed it") for t in failed
    )


def test_owner_with_another_start_time_is_a_reused_pid() -> None:
    me = f"{socket.gethostname()}:{os.getpid()}"
    assert owner_alive(me) is True
    assert owner_alive(me, process_start(os.getpid())) is True
    if process_start(os.getpid()) is not None:  # Linux: /proc says when a pid was handed out
        assert owner_alive(me, "1") is False
    assert owner_alive("another-host:1") is None


def test_search_without_matplotlib_keeps_the_result(search_cli) -> None:
    recipe = search_cli.recipe(trials=3)
    rc, out, err = search_cli.finish(search_cli.start(str(recipe), "--quiet", block="matplotlib"))
    assert rc == 0, err[-3000:]
    assert "warning" in err and "matplotlib" in err
    assert "Traceback" not in err
    winner = search_cli.search_dir / "winner.yaml"
    assert yaml.safe_load(winner.read_text())["allocation"]["method"] == "table"
    assert (search_cli.search_dir / "best_plan.json").is_file()
    assert not (search_cli.search_dir / "allocation.png").exists()
    assert f"winner recipe: {winner}" in out
