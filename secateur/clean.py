"""`secateur clean [PATH]`: list, and with --yes remove, what killed runs left behind.

Leftovers are the temporary folders and files runtime/store/leftovers.py marks and registers (an output
being written, an export, speed GGUFs, a join of model chunks, variant files) whose process is over.
Nothing unmarked is touched, and nothing of a run still going. Every run that writes also removes
them on its own (`announce_sweep`); this command is for looking, or for a disk that filled up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from secateur.runtime.store.leftovers import Leftover, find, remove, sweep

# commands that only read or print: no sweep before them
READ_ONLY = {"clean", "report", "graph", "recipe"}


def _mib(items: list[Leftover]) -> str:
    return f"{sum(x.bytes for x in items) / 2**20:,.1f} MiB"


def run_clean(args: argparse.Namespace) -> int:
    """List the leftovers (registry, and marked folders under PATH or the working folder); remove
    those of finished runs with --yes."""
    where = Path(args.path) if args.path else Path.cwd()
    if args.path and not where.is_dir():
        raise FileNotFoundError(f"{where}: no such folder")
    items = find([where], deep=bool(args.path), registry=not args.path)
    if args.path:  # only what lies under PATH, wherever the registry found it
        items = [x for x in items if where.resolve() in x.path.resolve().parents]
    gone = [x for x in items if x.state == "gone"]
    kept = [x for x in items if x.state != "gone"]
    scope = f"under {where}" if args.path else f"registered, or under {where}"
    if not items:
        print(f"secateur clean: no leftovers of killed runs ({scope})")
        return 0
    for x in kept:
        print(f"  kept: {x.describe()}")
    if not args.yes:
        for x in gone:
            print(f"  would remove: {x.describe()}")
        print(
            f"secateur clean: {len(gone)} leftover(s) of finished runs ({_mib(gone)}) {scope}; nothing "
            "removed (dry run): run again with --yes to remove them"
        )
        return 0
    done = remove(gone)
    for x in done:
        print(f"  removed: {x.describe()}")
    print(f"secateur clean: removed {len(done)} leftover(s) of killed runs ({_mib(done)})")
    return 0 if len(done) == len(gone) else 1


def announce_sweep(command: str) -> None:
    """Before a command that writes: remove killed runs' registered leftovers, saying so on stderr."""
    if command in READ_ONLY:
        return
    done = sweep()
    if done:
        shown = ", ".join(str(x.path) for x in done[:3]) + (
            f" and {len(done) - 3} more" if len(done) > 3 else ""
        )
        print(
            f"secateur: removed {len(done)} leftover(s) of killed runs ({_mib(done)}): {shown}",
            file=sys.stderr,
        )


def register(sub: argparse._SubParsersAction) -> None:
    """The `clean` subcommand."""
    cl = sub.add_parser(
        "clean",
        help="list (and with --yes remove) temporary folders and files that killed runs left behind",
    )
    cl.add_argument(
        "path",
        nargs="?",
        help="look only under this folder (default: every registered leftover, and the working folder)",
    )
    cl.add_argument("--yes", action="store_true", help="remove them (default: only list what would go)")
    cl.set_defaults(func=run_clean)
