"""Where a study lives and the lock its processes share.

Storage is a SQLite file by default (`<output>/search.db`) or any Optuna RDB URL. Schema
creation, study set-up, seeding and the admission of each trial run under one lock per storage:
a file lock beside a SQLite file, an advisory lock on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from filelock import FileLock, Timeout

from secateur.search.errors import SearchError, SearchStorageError


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
