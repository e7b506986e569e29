"""The loss curve of each healing run, as a PNG beside the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEAL_PNG = "heal.png"


def plot_heal(path: Path, heals: list[dict[str, Any]]) -> bool:
    """KL to the teacher against optimiser step, one line per heal (False without matplotlib)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # optional: reports still work without it
        return False
    runs = [h for h in heals if h.get("loss")]
    if not runs:
        return False
    fig = Figure(figsize=(6.0, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for h in runs:
        steps, losses = zip(*h["loss"])
        ax.plot(steps, losses, label=f"after stage {h['after_stage']} ({h['tokens']:,} tokens)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("KL(dense || pruned), top-k + rest")
    ax.set_yscale("log")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True
