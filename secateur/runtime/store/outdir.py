"""Output folders: what `--overwrite` may replace, atomic replacement, and leftovers of killed runs.

A Secateur output is written into a hidden temporary sibling and renamed into place, so a reader
only ever sees the old folder or the complete new one. The last file written is a manifest
(`.secateur-output`) listing every file of the folder: `--overwrite` replaces a folder only when
that manifest is there and the folder holds nothing it does not list, so a user's own folder, or
files a user added to an output, are never deleted. Single files (a GGUF export, a search folder's
winner.yaml, plots) are listed with their size and modification time in their folder's
`.secateur-files`: such a file is replaced only while it is listed and unchanged. Killed runs leave
marked `.NAME.tmp-PID-*` temporary folders (runtime/store/leftovers.py: any later run removes them) and
`.NAME.old-PID` siblings (an old output moved aside: the next write into NAME puts it back or removes it).
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
from typing import Any

from secateur.runtime.store.atomic import atomic_write_text
from secateur.runtime.store.leftovers import MARKER as PARTIAL_MARKER
from secateur.runtime.store.leftovers import new_partial_dir, release_partial_dir, sweep

MANIFEST = ".secateur-output"
FILES_MANIFEST = ".secateur-files"  # single files Secateur wrote in a folder: {name: {size, mtime_ns}}
# files of outputs written before the manifest existed (a folder with secateur.json and only these)
LEGACY_NAMES = re.compile(
    r"^(model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|config\.json|secateur\.json|"
    r"generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|chat_template\.jinja|"
    r"vocab\.json|merges\.txt|tokenizer\.model|added_tokens\.json|recipe\.yaml|recipe\.lock\.yaml|"
    r"report\.(md|json)|widths\.png|README\.md)$"
)
# files of DeciLM exports written before they carried the manifest (marked by configuration_decilm.py)
LEGACY_DECILM = re.compile(r"^(configuration_decilm\.py|" + LEGACY_NAMES.pattern[2:])


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


def contains(folder: Path, path: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved)."""
    return path == folder or folder in path.parents


def check_location(
    out: Path, protected: Iterable[Path] = (), *, is_file: bool = False, inside: Iterable[Path] = ()
) -> None:
    """Fail before any work when `out` cannot be written or would swallow a protected path.

    Protected paths are what the run reads (recipe, data, model) and the working folder: an output
    that is or contains one of them could delete it on --overwrite. `inside`: folders the output may
    not lie in either (an export inside its run folder would change that Secateur output).
    `is_file`: the output is one file (a GGUF), not a folder.
    """
    if out.is_symlink() and not out.exists():
        raise OutputLocationError(
            f"output {out} is a symbolic link to {os.readlink(out)}, which does not exist; give a real path"
        )
    resolved = out.resolve()
    for p in [Path.cwd(), Path.home(), *protected]:
        rp = Path(p).resolve()
        if contains(resolved, rp):
            raise OutputLocationError(
                f"output {out} is or contains {rp}, which this run reads or works in; choose another output"
            )
    for p in inside:
        if contains(Path(p).resolve(), resolved):
            raise OutputLocationError(f"output {out} lies inside {p}, which this run reads; write beside it")
    for p in resolved.parents:
        if (p / MANIFEST).is_file() or (p / "secateur.json").is_file():
            raise OutputLocationError(
                f"output {out} lies inside the Secateur output {p}; writing there would change that output "
                f"(and a later --overwrite of it would refuse): write beside it"
            )
    if is_file and out.is_dir():
        raise OutputLocationError(f"output {out} exists and is a folder, not a file")
    if not is_file and out.exists() and not out.is_dir():
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
    names = sorted(p.name for p in out.iterdir() if p.name != PARTIAL_MARKER)  # (a kill mid-rename)
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            listed = set(json.loads(manifest.read_text()).get("files", []))
        except (ValueError, AttributeError):
            listed = set()
        return [n for n in names if n != MANIFEST and n not in listed]
    if (out / "secateur.json").is_file():
        return [n for n in names if not LEGACY_NAMES.match(n)]
    if (out / "configuration_decilm.py").is_file():
        return [n for n in names if not LEGACY_DECILM.match(n)]
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


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def written_files(folder: Path) -> dict[str, Any]:
    """The single files Secateur recorded in `folder` (name -> size and modification time)."""
    try:
        files = json.loads((folder / FILES_MANIFEST).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return files if isinstance(files, dict) else {}


def record_files(paths: Iterable[Path]) -> None:
    """List files Secateur just wrote in their folders' `.secateur-files`, so a later run may replace
    them (written whole under a temporary name, then renamed: never half a manifest)."""
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(Path(p).parent, []).append(Path(p))
    for folder, files in by_folder.items():
        listed = written_files(folder)
        listed.update({p.name: _stamp(p) for p in files if p.is_file()})
        atomic_write_text(folder / FILES_MANIFEST, json.dumps({"files": listed}, indent=1, sort_keys=True))


def foreign_file(path: Path) -> bool:
    """Whether an existing `path` is a file Secateur did not write (or one changed since it did)."""
    return written_files(path.parent).get(path.name) != _stamp(path)


def check_file_replaceable(path: Path, overwrite: bool, flag: str | None = "--overwrite") -> None:
    """An existing file is replaced only when Secateur wrote it and nobody changed it since
    (`flag` None: no flag is needed for that, e.g. a search folder's own files)."""
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() or path.is_symlink():
        raise OutputExistsError(
            f"{path} exists and is not a file Secateur wrote; move it or choose another output"
        )
    if flag is not None and not overwrite:
        raise OutputExistsError(f"{path} exists; pass {flag} to replace it")
    if foreign_file(path):
        raise OutputExistsError(
            f"{path} exists and was not written by Secateur (or was changed since); Secateur only replaces "
            f"files it wrote: move it or choose another output"
        )


def clean_leftovers(out: Path) -> list[Path]:
    """Remove what killed runs left (`leftovers.sweep`: every registered leftover, and marked
    temporary folders beside `out`); put back an old output a killed run had moved aside."""
    removed = [x.path for x in sweep([out.parent])]
    if not out.parent.is_dir():
        return removed
    pat = re.compile(rf"^\.{re.escape(out.name)}\.old-(\d+)$")
    for p in sorted(out.parent.iterdir()):
        m = pat.match(p.name)
        # a Secateur output (its manifest) that a run now over moved aside between its two renames
        if not m or _pid_alive(int(m.group(1))) or p.is_symlink() or not (p / MANIFEST).is_file():
            continue
        if not out.exists():
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
    made: tuple[Path, Path | None] | None = None
    try:  # a signal from here on removes the temporary folder (new_partial_dir cleans up its own steps)
        made = new_partial_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-", f"for {out}")
        tmp, entry = made
        yield tmp
        files = sorted(str(p.relative_to(tmp)) for p in tmp.iterdir() if p.name != PARTIAL_MARKER)
        (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        apply_umask(tmp)
        check_replaceable(out, overwrite)  # nothing appeared in the meantime
    except BaseException:
        if made is not None:
            shutil.rmtree(made[0], ignore_errors=True)
            release_partial_dir(*made)
        raise
    old = None
    try:
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError:  # the rename itself failed: put the old output back, leave no temporary folder
        if old is not None and not out.exists():
            os.replace(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        release_partial_dir(tmp, entry)
        raise
    release_partial_dir(out, entry)  # the marker names the temporary folder: it claims nothing here
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
