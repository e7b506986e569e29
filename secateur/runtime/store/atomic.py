"""Files written whole: under a temporary name beside the target, then renamed over it in one step.

A reader (or a later run) sees the old file or the complete new one, never half of one: a kill mid-write
leaves the old file as it was, and a failed write (an exception, Ctrl-C) removes its temporary file.
A leaf (standard library only), so every room of the runtime and the packages above can use it.
Folders are replaced by `outdir.atomic_dir`; big temporary files a SIGKILL may strand are also
registered with `leftovers.partial_file` by their writers, so a later run removes them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def temp_name(path: Path) -> Path:
    """The default temporary name of `path`: hidden, beside it, this process's own (`.NAME.PID.tmp`)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def replacing(path: str | Path, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path (`tmp`, default `temp_name(path)`) for the block to write; when the block
    ends normally it is renamed over `path`, when it raises it is removed and `path` is untouched."""
    path = Path(path)
    tmp = temp_name(path) if tmp is None else Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_text(path: str | Path, text: str, tmp: str | Path | None = None) -> Path:
    """Write `text` to `path` in one step (see `replacing`); returns `path`."""
    with replacing(path, tmp) as t:
        t.write_text(text)
    return Path(path)
