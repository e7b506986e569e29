"""What a search leaves behind: PNG plots and the winner as a plain recipe.

Plots use matplotlib's object API with the Agg canvas (no pyplot state, no display needed).
The winner recipe pins every searched layer with `allocation: {method: table}`, so it
compiles without Optuna; the exact plan (attention counts included) goes to best_plan.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from secateur.runtime.allocation.space import Fractions, SearchSpace, project_to_budget, uniform_fractions
from secateur.search.winner import SearchResult


def _figure(width: float = 8.0, height: float = 4.0, rows: int = 1) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height * rows), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_allocation(best: Fractions, uniform: Fractions, space: SearchSpace, path: str | Path) -> Path:
    """Per-layer keep fraction of the best trial next to uniform, one panel per structure."""
    kinds = [k for k in ("mlp", "attn") if any(s.kind == k for s in space.slots)]
    fig = _figure(rows=len(kinds))
    width = 0.4
    for row, kind in enumerate(kinds, 1):
        ax = fig.add_subplot(len(kinds), 1, row)
        slots = [s for s in space.slots if s.kind == kind]
        xs = [s.layer for s in slots]
        ax.bar(
            [x - width / 2 for x in xs], [uniform[s.name] for s in slots], width, label="uniform", color="0.7"
        )
        ax.bar([x + width / 2 for x in xs], [best[s.name] for s in slots], width, label="best", color="C0")
        ax.set_ylabel(f"{'MLP' if kind == 'mlp' else 'attention'} keep")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(xs)
        ax.legend(loc="lower right", fontsize=8)
    fig.axes[-1].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_history(study: optuna.Study, path: str | Path) -> Path:
    """Proxy value of every finished trial (pruned ones at their last report) and the best so far."""
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    pruned = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state == TrialState.PRUNED and t.last_step is not None
    ]
    ax.scatter([t.number for t in done], [t.values[0] for t in done], s=14, color="C0", label="complete")
    if pruned:
        ax.scatter(
            [t.number for t in pruned],
            [t.intermediate_values[t.last_step] for t in pruned],
            s=14,
            marker="x",
            color="C3",
            label="pruned (partial)",
        )
    best, xs, ys = float("inf"), [], []
    for t in sorted(done, key=lambda t: t.number):
        best = min(best, t.values[0])
        xs.append(t.number)
        ys.append(best)
    ax.step(xs, ys, where="post", color="k", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_pareto(study: optuna.Study, path: str | Path) -> Path | None:
    """Quality against cost of a two-objective study: every trial, the front, the uniform and CFSP
    seeds at each of their budgets, and the dense model (no loss, full cost); None for one objective."""
    if len(study.directions) != 2:
        return None
    kinds = study.user_attrs.get("space", {}).get("objectives") or ["objective 0", "objective 1"]
    fig = _figure(6, 5)
    ax = fig.add_subplot(1, 1, 1)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials}
    ax.scatter([t.values[1] for t in done], [t.values[0] for t in done], s=10, color="0.7", label="searched")
    pts = sorted((t.values[1], t.values[0]) for t in done if t.number in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", ms=4, label="Pareto front")
    for name, marker, color in (("uniform", "s", "C0"), ("cfsp", "^", "C2")):
        seeds = [t for t in done if str(t.user_attrs.get("init", "")).split("@")[0] == name]
        if seeds:
            ax.scatter(
                [t.values[1] for t in seeds],
                [t.values[0] for t in seeds],
                s=40,
                marker=marker,
                color=color,
                label=name,
                zorder=3,
            )
    ax.scatter([1.0], [0.0], s=50, marker="*", color="k", label="dense", zorder=3)
    cost = {
        "latency": "predicted time / dense (target's latency model)",
        "params": "decoder linear params kept",
    }
    ax.set_xlabel(cost.get(kinds[1], kinds[1]))
    ax.set_ylabel(f"held-out {kinds[0]} to dense" if kinds[0] == "kl" else f"held-out {kinds[0]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def write_plots(result: SearchResult, out_dir: str | Path) -> list[Path]:
    """allocation.png, history.png and (two objectives only) pareto.png under `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    space = result.space
    uniform = result.uniform_plan or project_to_budget(uniform_fractions(space), space)
    paths = [
        plot_allocation(
            space.fractions_of(result.best_plan), space.fractions_of(uniform), space, out / "allocation.png"
        ),
        plot_history(result.study, out / "history.png"),
    ]
    pareto = plot_pareto(result.study, out / "pareto.png")
    return paths + ([pareto] if pareto is not None else [])
