"""Scaling a search out: worker processes share one study through a real PostgreSQL server.

The server is Debian's PostgreSQL (installed by scripts/setup.sh), started by the fixture on a
free loopback port with a throwaway data directory, and stopped afterwards. Nothing is mocked:
Optuna's RDB storage, SQLAlchemy and psycopg talk to the live server.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from secateur.graph.adapters import adapter_for
from secateur.recipe.allocation import SearchOptions
from secateur.recipe.compile import BudgetSpec
from secateur.search.run import run_search
from secateur.testing import tiny_model

from .conftest import SEARCH_TINY

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _pg_bindir() -> Path | None:
    """Debian keeps the server binaries in /usr/lib/postgresql/<major>/bin, off the PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name))
    return Path(dirs[-1]) if dirs else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: scripts/setup.sh installs Debian's postgresql")
        pytest.skip("PostgreSQL server binaries not found (scripts/setup.sh installs them)")
    pytest.importorskip("psycopg", reason="psycopg is installed by the [dev] extra")
    root = Path(tempfile.mkdtemp(prefix="secateur-pg-"))
    data, port = root / "data", _free_port()
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(root, "postgres", "postgres")
    run = functools.partial(subprocess.run, check=True, capture_output=True, text=True)
    run([*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "secateur", "-A", "trust", "--no-sync"])
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
    run([*pg_ctl, "-o", opts, "-l", str(root / "log"), "-w", "start"])
    try:
        yield f"postgresql+psycopg://secateur@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*pg_ctl, "-m", "immediate", "stop"])
        shutil.rmtree(root, ignore_errors=True)


WORKER = """
import sys, time
import torch
import secateur.search.objective as objective
from secateur.graph.adapters import adapter_for
from secateur.recipe.compile import BudgetSpec
from secateur.recipe.allocation import SearchOptions
from secateur.search.run import run_search
from secateur.testing import tiny_model

project = objective.project_to_budget
def slow_projection(*a, **k):  # a tiny trial takes milliseconds: make both processes overlap
    time.sleep(0.5)
    return project(*a, **k)
objective.project_to_budget = slow_projection
torch.set_num_threads(1)
model = tiny_model("llama", num_hidden_layers=4, intermediate_size=96)
g = torch.Generator().manual_seed(0)
calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (8, 32), generator=g)
opts = SearchOptions(trials=int(sys.argv[2]), seed=int(sys.argv[3]), sampler="random")
run_search(model, adapter_for(model.config), calib, held, BudgetSpec(fraction=0.2), [0, 1, 2, 3], opts,
           storage=sys.argv[1], study_name="machines", model_fingerprint="tiny", progress=False)
"""


def _finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    return [t for t in study.get_trials() if t.state in FINISHED]


def test_two_worker_processes_share_a_postgres_study(postgres_url: str) -> None:
    torch.set_num_threads(1)
    model = tiny_model("llama", **SEARCH_TINY)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (8, 32), generator=g), torch.randint(0, 128, (8, 32), generator=g)
    args = (model, adapter_for(model.config), calib, held, BudgetSpec(fraction=0.2), [0, 1, 2, 3])
    kw = dict(
        storage=postgres_url,
        study_name="workers",
        model_factory=functools.partial(tiny_model, "llama", **SEARCH_TINY),
        progress=False,
    )
    res = run_search(*args, SearchOptions(trials=6, sampler="random"), workers=2, **kw)
    finished = _finished(postgres_url, "workers")  # read back from the server, not from memory
    assert len(finished) == 6
    assert len({t.number for t in finished}) == 6
    assert len({t.user_attrs["owner"] for t in finished}) == 2  # both processes ran trials
    assert res.best_value == min(t.value for t in finished if t.state == TrialState.COMPLETE)

    # the same command with a larger count resumes the server's study instead of starting over
    run_search(*args, SearchOptions(trials=8, sampler="random"), workers=2, **kw)
    again = _finished(postgres_url, "workers")
    assert len(again) == 8 and {t.number for t in finished} < {t.number for t in again}


def test_independent_processes_as_machines_share_one_study(postgres_url: str, tmp_path: Path) -> None:
    """Two `run_search` processes started separately (as on two machines) split one count."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(script), postgres_url, "10", str(seed)], env=env)
        for seed in (0, 1)
    ]
    deadline = time.time() + 300
    for p in procs:
        assert p.wait(timeout=max(1, deadline - time.time())) == 0
    finished = _finished(postgres_url, "machines")
    owners = {t.user_attrs["owner"] for t in finished}
    # a trial is admitted only while finished + running < 10, under an advisory lock: exactly 10
    assert len(finished) == 10
    assert len({t.number for t in finished}) == len(finished)
    assert len(owners) == 2
    assert not optuna.load_study(study_name="machines", storage=postgres_url).get_trials(
        states=(TrialState.RUNNING, TrialState.WAITING)
    )


def _exact(url: str, name: str, total: int) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == total, [(t.number, t.state.name) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.number for t in trials}) == len(trials)
    assert sum(t.user_attrs.get("init") == "uniform" for t in finished) == 1
    return finished


def test_cli_workers_on_postgres(postgres_url: str, search_cli) -> None:
    recipe = search_cli.recipe("cli-workers", trials=6)
    proc = search_cli.start(str(recipe), "--storage", postgres_url, "--workers", "2", "--quiet")
    rc, out, err = search_cli.finish(proc)
    assert rc == 0, err[-3000:]
    finished = _exact(postgres_url, "cli-workers", 6)
    assert len({t.user_attrs["owner"] for t in finished}) == 2
    assert (search_cli.search_dir / "winner.yaml").is_file()


def test_processes_started_together_on_a_new_postgres_database(postgres_url: str, search_cli) -> None:
    """Two `secateur search` processes create Optuna's schema in an empty database at once."""
    import psycopg

    server, _, _ = postgres_url.rpartition("/")
    with psycopg.connect(f"{server.replace('+psycopg', '')}/postgres", autocommit=True) as con:
        con.execute("CREATE DATABASE together")
    url = f"{server}/together"
    recipe = search_cli.recipe("together", trials=6)
    barrier = (search_cli.root / "barrier", 2)
    procs = [
        search_cli.start(str(recipe), "--storage", url, "--quiet", tag=str(i), barrier=barrier)
        for i in range(2)
    ]
    for p in procs:
        rc, _, err = search_cli.finish(p)
        assert rc == 0, err[-3000:]
    _exact(url, "together", 6)
