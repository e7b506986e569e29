"""Write a benchmark's .json and .md result files, keeping the hand-written reading notes.

A benchmark rewrites its table each run (and on every `--append`); the notes a person wrote under
the table, after the NOTES marker, would be lost with it. Both files are written to a temporary
name and renamed, so a run stopped mid-write never leaves half a table behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

NOTES = "<!-- notes: written by hand, kept when the benchmark rewrites this file -->"


def _replace(path: Path, write: Callable[[Path], Any]) -> None:
    """Let `write` fill a temporary file beside `path`, then rename it over `path` in one step."""
    tmp = path.with_name(f".tmp.{path.name}")  # same suffix, so writers that go by it (savefig) still do
    write(tmp)
    os.replace(tmp, path)


def kept_notes(md: Path) -> str:
    """The text from the NOTES marker to the end of `md` ('' when the file or the marker is absent)."""
    if not md.is_file():
        return ""
    text = md.read_text()
    at = text.find(NOTES)
    return text[at:] if at >= 0 else ""


def write_results(out: str | Path, payload: Any, lines: list[str]) -> None:
    """Write `payload` to OUT.json and `lines` (+ the notes kept from the old OUT.md) to OUT.md."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    notes = kept_notes(md)
    text = "\n".join(lines) + "\n" + (f"\n{notes.rstrip()}\n" if notes else "")
    _replace(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(payload, indent=2, default=str)))
    _replace(md, lambda p: p.write_text(text))


def earlier_results(out: str | Path, keep: bool, default: Any) -> Any:
    """OUT.json of an earlier run when `keep` (--append, --resume) and it exists, else `default`:
    what an earlier run measured is kept and not measured again."""
    path = Path(out).with_suffix(".json")
    return json.loads(path.read_text()) if keep and path.is_file() else default


def machine() -> str:
    """The machine line every result table carries: OS, CPU, threads, torch and GPU."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"{platform.system()} {platform.machine()} ({platform.processor() or 'unknown CPU'}), "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, GPU: {gpu}"
    )


def plot_tradeoff(rows: list[dict], path: str | Path, title: str) -> Path | None:
    """Perplexity ratio vs prefill and decode speedup, one point per (method, budget): the trade-off at a glance.

    Returns None (and writes nothing) when matplotlib is missing or no row has a measured speedup.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    dense = next((r for r in rows if r["method"] == "dense"), None)
    pts = [r for r in rows if r["method"] != "dense" and "prefill_speedup" in r]
    if dense is None or not pts:
        return None
    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    markers = {0.2: "o", 0.3: "s"}
    methods = sorted({r["method"] for r in pts})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    for col, key, label in ((1, "prefill_speedup", "prefill"), (2, "decode_speedup", "decode")):
        ax = fig.add_subplot(1, 2, col)
        for r in pts:
            xy = (r[key], r["ppl"] / dense["ppl"])
            ax.scatter(*xy, color=colors[r["method"]], marker=markers.get(round(r["ratio"], 2), "^"), s=50)
            ax.annotate(f"{r['method']} {r['ratio']:.0%}", xy, fontsize=7)
        ax.axvline(1.0, color="grey", lw=0.5)
        ax.set_yscale("log")
        ax.set_xlabel(f"{label} speedup vs dense (x)")
        ax.set_ylabel("perplexity / dense (log)")
        ax.set_title(f"{title}: {label}", fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    _replace(out, fig.savefig)
    return out
