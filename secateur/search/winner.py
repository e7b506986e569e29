"""What a search leaves: the result (winner, seeds, trials table) and the winner as a plain recipe."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import TrialState
from torch import nn

from secateur.graph.plan import Plan
from secateur.recipe.allocation import SearchOptions
from secateur.runtime.allocation.space import SearchSpace
from secateur.runtime.store.atomic import atomic_write_text
from secateur.search.errors import SearchError
from secateur.search.evolution import feasible
from secateur.search.pareto import front as pareto_front
from secateur.search.pareto import winner as pareto_winner
from secateur.search.rescore import Rescored
from secateur.search.speed import SpeedBudget


@dataclass
class SearchResult:
    """The winning plan and value, one row per trial, and the live study."""

    best_plan: Plan
    best_value: float
    best_trial: int
    trials_table: list[dict[str, Any]]
    study: optuna.Study
    space: SearchSpace
    uniform_value: float | None = None
    uniform_plan: Plan | None = None
    storage: str | None = None
    variants: dict[str, Any] | None = None  # the variant database: folder, build seconds, variants built
    # the seeded allocations (uniform, cfsp): value, trial number and plan of each that completed
    seeds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # candidates compiled the way the recipe compiles and re-scored (search/rescore.py), best first
    rescored: list[dict[str, Any]] = field(default_factory=list)
    rescored_model: nn.Module | None = None  # the winner as compiled by the rescoring (when built here)
    front: list[dict[str, Any]] = field(default_factory=list)  # Pareto mode: the non-dominated points


def trials_table(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, seed tag, seconds, parameters removed, fractions."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.values[0] if t.values else None,
                **({"cost": t.values[1]} if t.values and len(t.values) > 1 else {}),
                "init": t.user_attrs.get("init"),
                "seconds": t.duration.total_seconds() if t.duration is not None else None,
                "removed": t.user_attrs.get("removed"),
                **{k: round(float(v), 4) for k, v in t.params.items()},
            }
        )
    return rows


def apply_rescore(result: SearchResult, rescored: Rescored) -> None:
    """The best compiled candidate becomes the winner; every compiled value is kept in the result."""
    top = rescored.rows[0]
    result.rescored, result.rescored_model = rescored.rows, rescored.model
    result.best_plan, result.best_value, result.best_trial = (
        Plan.from_dict(top["plan"]),
        top["value"],
        top["trial"],
    )
    for row in rescored.rows:
        if row["init"] in result.seeds:
            result.seeds[row["init"]]["compiled"] = row["value"]


def search_result(
    study: optuna.Study,
    space: SearchSpace,
    url: str | None,
    options: SearchOptions | None = None,
    speed: SpeedBudget | None = None,
) -> SearchResult:
    """The winner among complete trials that meet the budget (Pareto mode: the front's pick), the
    seeds' values and plans, and one row per trial."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if feasible(t)]
    if not done:
        raise SearchError(
            f"study {study.study_name!r} has no complete trial that meets its budget (all pruned, failed or too slow)"
        )
    kinds = options.objectives if options is not None else None
    if kinds:
        best = pareto_winner(study, space, speed)
    else:
        best = min(done, key=lambda t: (t.values[0], t.number))
    uniform = [t for t in done if t.user_attrs.get("init") == "uniform"]
    seeds = {
        t.user_attrs["init"]: {"value": float(t.values[0]), "trial": t.number, "plan": t.user_attrs["plan"]}
        for t in done
        if t.user_attrs.get("init")
    }
    return SearchResult(
        seeds=seeds,
        best_plan=Plan.from_dict(best.user_attrs["plan"]),
        best_value=float(best.values[0]),
        best_trial=best.number,
        trials_table=trials_table(study),
        study=study,
        space=space,
        uniform_value=float(uniform[0].values[0]) if uniform else None,
        uniform_plan=Plan.from_dict(uniform[0].user_attrs["plan"]) if uniform else None,
        storage=url,
        front=pareto_front(study, list(kinds)) if kinds else [],
    )


def winner_table(plan: Plan, space: SearchSpace) -> dict[str, Any]:
    """Per-layer keep fractions for `allocation.table`: a number when one structure is searched,
    {mlp: .., attention: ..} when both are, so the compiled counts equal the plan's exactly."""
    fractions = space.fractions_of(plan)
    lo, hi = space.sample_range

    def clip(v: float) -> float:
        return min(max(round(v, 6), lo), hi)

    table: dict[str, Any] = {}
    for i in space.layers:
        mlp, attn = fractions.get(f"mlp_{i}"), fractions.get(f"attn_{i}")
        if mlp is not None and attn is not None:
            table[str(i)] = {"mlp": clip(mlp), "attention": clip(attn)}
        elif mlp is not None or attn is not None:
            table[str(i)] = clip(mlp if mlp is not None else attn)
    return table


def write_winner_recipe(
    recipe_dict: dict[str, Any],
    plan: Plan,
    path: str | Path,
    space: SearchSpace,
    note: str = "",
) -> Path:
    """Write the recipe with `allocation: {method: table, table: ...}` and best_plan.json next to it.

    The table has one keep fraction per searched layer. When attention is searched too, the
    compiler applies that fraction to every structure of the layer, so the exact counts live
    in best_plan.json (Plan.to_dict()).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recipe = copy.deepcopy(recipe_dict)
    recipe.pop("extends", None)
    alloc = recipe.get("allocation", {})
    recipe["allocation"] = {"method": "table", "table": winner_table(plan, space)}
    if alloc.get("compile", "sequential") != "sequential":  # compiled as it was scored
        recipe["allocation"]["compile"] = alloc["compile"]
        if alloc.get("variants_dir"):
            recipe["allocation"]["variants_dir"] = str(Path(alloc["variants_dir"]).expanduser().resolve())
    plan_path = path.parent / "best_plan.json"
    atomic_write_text(plan_path, json.dumps(plan.to_dict(), indent=2) + "\n")
    header = ["# Allocation found by `secateur search`; a plain recipe, compiled without Optuna."]
    if note:
        header.append(f"# {note}")
    body = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write_text(path, "\n".join(header) + "\n" + body)
    return path
