"""Files written whole (runtime/store/atomic.py): the old file or the complete new one, never half,
and no temporary file left behind by a write that failed."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from secateur.runtime.store import atomic
from secateur.runtime.store.atomic import atomic_write_text, replacing, temp_name


def test_a_write_replaces_the_old_file_and_leaves_only_it(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    f.write_text("old")
    assert atomic_write_text(f, "new") == f
    assert f.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_write_that_fails_midway_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("old")
    # the encoder fails after the temporary file is open and the first characters are written
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(f, "x" * 100_000 + "\udcff")
    assert f.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_a_writer_that_raises_keeps_the_old_file_and_removes_its_named_temporary(tmp_path, exc) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"old")
    tmp = tmp_path / "model.safetensors.tmp.7"  # a site's own temporary name
    with pytest.raises(exc), replacing(f, tmp) as t:
        assert t == tmp
        t.write_bytes(b"half")
        raise exc
    assert f.read_bytes() == b"old" and not tmp.exists()


def test_a_new_file_appears_only_when_the_block_ends(tmp_path: Path) -> None:
    f = tmp_path / "sub.yaml"
    with replacing(f) as t:
        t.write_text("done")
        assert t == temp_name(f) and t.name.startswith(".sub.yaml.") and not f.exists()
    assert f.read_text() == "done" and not t.exists()


def test_a_killed_writer_leaves_the_old_file_whole(tmp_path: Path) -> None:
    f = tmp_path / "front.json"
    f.write_text("old")
    code = (
        "import importlib.util, os, signal, sys\n"
        "spec = importlib.util.spec_from_file_location('atomic', sys.argv[1])\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "with m.replacing(sys.argv[2]) as t:\n"
        "    t.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    p = subprocess.run([sys.executable, "-c", code, atomic.__file__, str(f)], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    assert f.read_text() == "old"
    assert [q.read_text() for q in tmp_path.iterdir() if q != f] == ["half"]  # its temporary only
