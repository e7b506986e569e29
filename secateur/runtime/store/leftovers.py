"""Temporary folders and files of killed runs: found and removed by any later run, or by `secateur clean`.

Secateur writes every output into a temporary folder first (`partial_dir`: the atomic output folder,
exports, `secateur speed`'s GGUFs, a search's validation model) and big files under a temporary name
(`partial_file`: a GGUF joined from chunks, variant-database files). A run killed with SIGKILL, or by
the kernel, leaves them behind, sometimes as large as the model. Two marks say "Secateur made this,
for a run that may be over":
- inside each temporary folder a `.secateur-partial` file (this process's id, start time and boot,
  the folder's own name, what it was for);
- an entry per folder or file in a registry (`~/.cache/secateur/partial`, or `SECATEUR_PARTIAL_DIR`),
  so a later run finds leftovers wherever they are.
A leftover is removed only when its mark says so and the process that made it is gone (its id is
free or now belongs to a process started later, or the machine rebooted); a folder's marker must also
name that folder (an output renamed into place keeps no claim on it). Nothing is ever removed by name
alone. `sweep()` runs at the start of every run that writes; `secateur clean` lists and removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateur.runtime.store.atomic import atomic_write_text

MARKER = ".secateur-partial"


def registry_dir() -> Path:
    """SECATEUR_PARTIAL_DIR, else ~/.cache/secateur/partial (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("SECATEUR_PARTIAL_DIR")
    if root:
        return Path(root)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "secateur" / "partial"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """A process's start time (clock ticks since boot, Linux), so a reused id is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id(), "host": socket.gethostname()}


def owner_state(mark: dict[str, Any]) -> str:
    """'gone' (the process that wrote `mark` is over), 'running', or 'other host' (cannot tell)."""
    if mark.get("host") != socket.gethostname():
        return "other host"
    boot = _boot_id()
    if mark.get("boot") and boot and mark["boot"] != boot:
        return "gone"  # the machine rebooted since
    pid = int(mark.get("pid", 0))
    if pid <= 0:
        return "gone"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:
        pass
    start = _start_time(pid)
    return "gone" if mark.get("start") and start and start != mark["start"] else "running"


def _register(path: Path, kind: str, purpose: str, token: str) -> Path | None:
    """Add a registry entry for `path` (None when the registry cannot be written: markers still work)."""
    entry = {**_owner(), "path": str(path.resolve()), "kind": kind, "purpose": purpose, "token": token}
    folder = registry_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(folder / f"{entry['pid']}-{token}.json", json.dumps(entry))
    except OSError:
        return None


def _unregister(entry: Path | None) -> None:
    if entry is not None:
        with contextlib.suppress(OSError):
            entry.unlink()


def new_partial_dir(parent: Path, prefix: str, purpose: str) -> tuple[Path, Path | None]:
    """A fresh temporary folder in `parent`, marked and registered; (folder, registry entry)."""
    parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    folder = parent / f"{prefix}{token}"
    entry = _register(folder, "folder", purpose, token)  # first: a kill right after mkdir is covered
    try:
        folder.mkdir(mode=0o700)
        mark = {**_owner(), "name": folder.name, "purpose": purpose, "token": token, "created": time.time()}
        (folder / MARKER).write_text(json.dumps(mark))
    except BaseException:  # SIGTERM or Ctrl-C in these few lines: the caller has no folder to clean up yet
        shutil.rmtree(folder, ignore_errors=True)
        _unregister(entry)
        raise
    return folder, entry


def release_partial_dir(folder: Path, entry: Path | None) -> None:
    """The folder is done with (renamed into place or removed): drop its marker and registry entry."""
    with contextlib.suppress(OSError):
        (folder / MARKER).unlink()
    _unregister(entry)


@contextlib.contextmanager
def partial_dir(
    parent: str | Path | None = None, prefix: str = "secateur-", purpose: str = ""
) -> Iterator[Path]:
    """A marked, registered temporary folder (in `parent`, default the system's temp folder),
    removed at the end of the block; if the process is killed, a later run removes it."""
    folder, entry = new_partial_dir(Path(parent or tempfile.gettempdir()), prefix, purpose)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        _unregister(entry)


@contextlib.contextmanager
def partial_file(path: str | Path, purpose: str = "") -> Iterator[Path]:
    """Register `path` (a file about to be written under a temporary name) for the block: the caller
    renames or removes it; a killed run's file is removed by a later run."""
    path = Path(path)
    entry = _register(path, "file", purpose, secrets.token_hex(8))
    try:
        yield path
    finally:
        _unregister(entry)


@dataclass(frozen=True)
class Leftover:
    """A temporary folder or file some run left: `state` 'gone' ones may be removed."""

    path: Path
    kind: str  # folder or file
    state: str  # gone, running, other host
    pid: int
    purpose: str
    bytes: int
    entry: Path | None = None  # its registry entry

    def describe(self) -> str:
        owner = {"gone": f"pid {self.pid} is over", "running": f"pid {self.pid} is still running"}
        size = f"{self.bytes / 2**20:,.1f} MiB"
        what = f", {self.purpose}" if self.purpose else ""
        return f"{self.path} ({self.kind}, {size}, {owner.get(self.state, self.state)}{what})"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marked(folder: Path, token: str | None = None) -> dict[str, Any] | None:
    """The folder's marker when it is a temporary folder Secateur made under this very name."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    if token is not None and folder.name.endswith(token) and not any(folder.iterdir()):
        return {"name": folder.name, "token": token}  # registered, killed before its marker: still empty
    mark = _read(folder / MARKER)
    if mark is None or mark.get("name") != folder.name or (token is not None and mark.get("token") != token):
        return None
    return mark


def _from_registry() -> Iterator[Leftover]:
    folder = registry_dir()
    if not folder.is_dir():
        return
    for f in sorted(folder.glob("*.json")):
        entry = _read(f)
        if entry is None:
            continue
        path = Path(entry.get("path", ""))
        if entry.get("kind") == "folder":
            ok = _marked(path, entry.get("token")) is not None
        else:
            ok = path.is_file() and not path.is_symlink()
        state = owner_state(entry)
        if not ok:  # already gone (or not ours any more): the entry alone is stale
            if state == "gone":
                _unregister(f)
            continue
        yield Leftover(path, entry["kind"], state, int(entry.get("pid", 0)), entry.get("purpose", ""), 0, f)


def _in_folders(folders: Iterable[Path], deep: bool) -> Iterator[Leftover]:
    for top in folders:
        if not top.is_dir():
            continue
        for root, dirs, _files in os.walk(top):
            for d in list(dirs):
                mark = _marked(Path(root) / d)
                if mark is not None:
                    dirs.remove(d)  # a temporary folder: what it holds is part of it
                    yield Leftover(
                        Path(root) / d,
                        "folder",
                        owner_state(mark),
                        int(mark.get("pid", 0)),
                        mark.get("purpose", ""),
                        0,
                    )
            if not deep:
                break


def find(folders: Iterable[Path] = (), deep: bool = False, registry: bool = True) -> list[Leftover]:
    """Leftovers in the registry (when `registry`) and marked temporary folders in `folders` (their
    children, or their whole trees when `deep`), each once, with its size. Without `registry`, the
    registry's entries still come along for what lies in `folders`, so removing them drops the entry."""
    seen: dict[Path, Leftover] = {}
    found = list(_from_registry())
    if not registry:
        tops = [Path(f).resolve() for f in folders]
        found = [
            x for x in found if any(t == x.path.resolve() or t in x.path.resolve().parents for t in tops)
        ]
    for item in [*found, *_in_folders([Path(f) for f in folders], deep)]:
        key = item.path.resolve()
        if key not in seen or (seen[key].entry is None and item.entry is not None):
            seen[key] = item
    return [
        Leftover(x.path, x.kind, x.state, x.pid, x.purpose, _size(x.path), x.entry) for x in seen.values()
    ]


def remove(items: Iterable[Leftover]) -> list[Leftover]:
    """Remove the leftovers whose process is over (checked again just before); the removed ones."""
    done = []
    for x in items:
        if x.state != "gone":
            continue
        if x.kind == "folder":
            mark = _marked(x.path, (_read(x.entry) or {}).get("token") if x.entry else None)
            if mark is None or ("pid" in mark and owner_state(mark) != "gone"):
                continue
            shutil.rmtree(x.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                x.path.unlink()
        _unregister(x.entry)
        done.append(x)
    return done


def sweep(folders: Iterable[Path] = ()) -> list[Leftover]:
    """What a run does first: remove every registered leftover of a killed run, and marked ones
    among the children of `folders` (where it is about to write)."""
    try:
        return remove(find(folders))
    except OSError:  # a leftover we cannot remove is no reason to fail the run that found it
        return []
