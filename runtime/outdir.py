"""Output folders: what `--overwrite` may replace, atomic replacement, and leftovers of killed runs.

A Secateur output is written into a hidden temporary sibling and renamed into place, so a reader
only ever sees the old folder or the complete new one. The last file written is a manifest
(`.secateur-output`) listing every file of the folder: `--overwrite` replaces a folder only when
that manifest is there and the folder holds nothing it does not list, so a user's own folder, or
files a user added to an output, are never deleted. Killed runs leave `.NAME.tmp-PID-*` and
`.NAME.old-PID` siblings; the next write removes them (or puts a displaced old output back).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

MANIFEST = ".secateur-output"
# files of outputs written before the manifest existed (a folder with secateur.json and only these)
LEGACY_NAMES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|secateur\.json|"
    r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.jinja|"
    r"vocab\.json|merges\.txt|tokenizer\.model|added_tokens\.json|recipe\.yaml|recipe\.lock\.yaml|"
    r"report\.(md|json)|widths\.png|README\.md)$"
)


class OutputExistsError(FileExistsError):
    """The output folder exists and may not (or, without --overwrite, will not) be replaced."""


class OutputLocationError(ValueError):
    """The output path cannot be written: a file in the way, no permission, a protected folder."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_location(out: Path, protected: Iterable[Path] = ()) -> None:
    """Fail before any work when `out` cannot be written or would swallow a protected path.

    Protected paths are what the run reads (recipe, data, model) and the working folder: an output
    folder that is or contains one of them could delete it on --overwrite.
    """
    resolved = out.resolve()
    for p in [Path.cwd(), Path.home(), *protected]:
        rp = Path(p).resolve()
        if _contains(resolved, rp):
            raise OutputLocationError(
                f"output {out} is or contains {rp}, which this run reads or works in; choose another output folder"
            )
    if out.exists() and not out.is_dir():
        raise OutputLocationError(f"output {out} exists and is not a folder")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputLocationError(f"output {out}: {parent} is a file, so no folder can be created there")
    try:
        probe = tempfile.mkdtemp(prefix=".secateur-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as e:
        raise OutputLocationError(f"output {out}: cannot create folders in {parent} ({e.strerror})") from e


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` that Secateur did not write there (empty: the folder may be replaced)."""
    names = sorted(p.name for p in out.iterdir())
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            listed = set(json.loads(manifest.read_text()).get("files", []))
        except (ValueError, AttributeError):
            listed = set()
        return [n for n in names if n != MANIFEST and n not in listed]
    if (out / "secateur.json").is_file():
        return [n for n in names if not LEGACY_NAMES.match(n)]
    return names or ["(an empty folder Secateur did not create)"]


def check_replaceable(out: Path, overwrite: bool) -> None:
    """An existing `out` is replaced only with --overwrite and only when it is a Secateur output."""
    if not out.exists():
        return
    if not overwrite:
        raise OutputExistsError(f"output directory {out} exists; pass --overwrite to replace it")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputExistsError(
            f"output directory {out} is not a Secateur output, or holds files Secateur did not write "
            f"({shown}); --overwrite only replaces Secateur's own outputs: move those files or choose "
            f"another output folder"
        )


def clean_leftovers(out: Path) -> list[Path]:
    """Remove temporary siblings of `out` left by killed runs; put a displaced old output back."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for p in sorted(out.parent.iterdir()):
        m = pat.match(p.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists() and (p / MANIFEST).is_file():
            os.replace(p, out)  # killed between the two renames: the old output comes back
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def apply_umask(folder: Path) -> None:
    """mkdtemp creates 0700 folders and some writers 0600 files: give them the user's usual modes."""
    mask = _umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces `out_dir` only if the block succeeds."""
    out = Path(out_dir)
    clean_leftovers(out)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
        files = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir())
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        apply_umask(tmp)
        check_replaceable(out, overwrite)  # nothing appeared in the meantime
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
