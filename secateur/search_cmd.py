"""`secateur search`: recipe in, searched allocation out (a plain recipe, plots, optionally the model).

The model is loaded once; statistics and the dense reference are computed once; every trial
applies a projected allocation, scores the proxy and undoes itself. The study lives in a
SQLite file beside the output (or any Optuna storage URL), so the same command resumes.
"""

from __future__ import annotations

# `secateur.api` and `secateur.search_validate` (the prune pipeline: transformers' Trainer and peft
# through healing, ~10 s to import on a busy CPU) are imported where they run, after the search, and
# only when it validates or compiles the winner.
import copy
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan
from secateur.lock import model_fingerprint
from secateur.recipe.compile import (
    BudgetSpec,
    budget_spec,
    eligible_layers,
    feasible_fraction,
    planned_removal,
    removal_goal,
)
from secateur.recipe.load import load_recipe, resolved_dict
from secateur.recipe.schema import Recipe
from secateur.runtime.measure.timing import peak_memory
from secateur.runtime.prune.sequential import prune_sequential
from secateur.runtime.speed.latency import LatencyModel
from secateur.runtime.store.atomic import atomic_write_text
from secateur.runtime.store.data import (
    calibration_tokens,
    recipe_windows,
    resolve_text_source,
)
from secateur.runtime.store.loader import LoadedModel, load_model, resolve_source
from secateur.runtime.store.outdir import (
    MANIFEST,
    OutputLocationError,
    check_file_replaceable,
    check_location,
    check_replaceable,
    clean_leftovers,
    record_files,
)
from secateur.search.plots import write_plots
from secateur.search.run import run_search
from secateur.search.speed import SpeedBudget
from secateur.search.storage import resolve_storage
from secateur.search.winner import SearchResult, winner_table, write_winner_recipe
from secateur.speed_target import dense_probe, resolve_speed, target_of


@dataclass
class SearchOutcome:
    """Where the winner recipe and plots were written, and the summary numbers."""

    output: Path
    winner_recipe: Path
    summary: dict[str, Any]
    winner_model: nn.Module | None = (
        None  # the winner as the re-scoring compiled it (sequential recipes), in memory
    )


def reload_model(model_id: str, dtype: str, device: str, base_dir: str | None) -> nn.Module:
    """The recipe's model, loaded again in a `--workers` process (picklable through functools.partial)."""
    return load_model(model_id, dtype, device, base_dir=base_dir, tokenizer=False).model


def sequential_compiler(
    recipe: Recipe, lm: LoadedModel, calib: torch.Tensor
) -> Callable[[nn.Module, Plan], None]:
    """The recipe's sequential compile of a plan (selection, error correction, refinement included),
    as `secateur prune` runs it on the winner recipe: what the re-scoring after the search builds."""

    def compile_plan(model: nn.Module, plan: Plan) -> None:
        plan = dc_replace(
            copy.deepcopy(plan),  # the pass may rewrite its plan's layers
            selection=recipe.importance.selection,
            error_correction=recipe.restore.error_correction,
            refine_steps=recipe.restore.refine_steps,
            refine_lr=recipe.restore.refine_lr,
        )
        prune_sequential(model, lm.adapter, calib, plan, progress=False)

    return compile_plan


def seed_line(result: SearchResult, kind: str) -> str:
    """The winner against uniform and against the CFSP seed at the same budget, on the search's own
    fitness (compiled values when the candidates were re-scored)."""
    key = "compiled" if result.rescored else "value"
    parts = [f"winner (trial {result.best_trial}) {kind} {result.best_value:.4f}"]
    for name in ("uniform", "cfsp"):
        seed = result.seeds.get(name)
        if seed is not None and key in seed:
            parts.append(f"{name} {seed[key]:.4f} ({result.best_value / seed[key] - 1:+.1%})")
    where = "compiled as the recipe compiles" if result.rescored else "as scored"
    return f"search: {', '.join(parts)}; {where}"


def pareto_speed(recipe: Recipe, adapter: ModelAdapter) -> SpeedBudget:
    """The recipe target's latency model as a Pareto cost (no goal to meet: 1.0 of dense time)."""
    b = recipe.budget
    lat = LatencyModel.build(target_of(recipe), dense_probe(adapter), int(b.multiple_of), b.min_keep, print)
    return SpeedBudget(lat, 1.0, b.phase, adapter.num_layers)


def write_front(path: Path, result: SearchResult, lm: LoadedModel, speed: SpeedBudget | None) -> Path:
    """front.json: every non-dominated point with its values, removal, predicted time per phase
    (with a latency model) and allocation table, so `prune --pick` compiles one without Optuna."""
    points = []
    for row in result.front:
        plan = Plan.from_dict(row["plan"])
        point = {**row, "removed_params": planned_removal(lm.model, lm.adapter, plan)}
        if speed is not None:
            point["predicted"] = speed.ratios(plan)
        point["table"] = winner_table(plan, result.space)
        points.append(point)
    doc = {
        "objectives": result.study.user_attrs.get("space", {}).get("objectives"),
        "points": points,
    }
    return atomic_write_text(path, json.dumps(doc, indent=1) + "\n")  # a kill never leaves half a front


def _warn(line: str) -> None:
    print(f"secateur search: warning: {line}", file=sys.stderr, flush=True)


def absolutize(doc: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the recipe's local file references absolute, so the winner runs from its own folder."""
    mid = doc["model"]["id"]
    if (base / mid).exists():
        doc["model"]["id"] = str((base / mid).resolve())
    cal = doc["calibration"]
    if (base / cal["dataset"]).exists():
        cal["dataset"] = str((base / cal["dataset"]).resolve())
    for ps in doc.get("evaluate", {}).get("perplexity", []):
        if (base / ps["dataset"]).exists():
            ps["dataset"] = str((base / ps["dataset"]).resolve())
    return doc


# every file `secateur search` writes in its folder besides the study (search.db, resumed on purpose)
SEARCH_FILES = (
    "winner.yaml",
    "best_plan.json",
    "allocation.png",
    "history.png",
    "pareto.png",
    "front.json",
    "picked.yaml",
    "uniform.yaml",
    "validation.json",
    "validation.md",
)


def check_counts(trials: int | None, workers: int) -> None:
    """--trials and --workers are counts of at least one; workers (each a process loading the model)
    at most the cores this process may use (two are always allowed)."""
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}")
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > max(cores, 2):  # each worker process loads the model and takes a share of the cores
        raise ValueError(f"--workers {workers} is more than the {cores} CPU cores this process may use")


def check_search_output(out: Path, reads: list[Path], compiled: Path | None) -> None:
    """Before the model loads: the search folder is no source and holds no file of a user's (or one
    changed since Secateur wrote it) under a name the search writes; the compiled model's folder
    (--compile) would be replaced only if it is a Secateur output."""
    check_location(out, reads)
    if (out / MANIFEST).is_file() or (out / "secateur.json").is_file():
        raise OutputLocationError(
            f"search folder {out} is a Secateur model output; the search's files would change it (and a later "
            "--overwrite of it would refuse): choose another folder"
        )
    for name in SEARCH_FILES:
        check_file_replaceable(out / name, True, flag=None)
    if compiled is not None:
        check_location(compiled, reads)
        clean_leftovers(compiled)
        check_replaceable(compiled, True)


def _checked_recipe(recipe_path: str | Path, overrides: tuple[str, ...]) -> Recipe:
    """The recipe, refused unless it searches and holds its model in memory."""
    recipe = load_recipe(recipe_path, overrides)
    if recipe.allocation.method != "search":
        raise ValueError(
            f"{recipe_path}: allocation.method is {recipe.allocation.method!r}; set it to 'search'"
        )
    if recipe.model.stream:
        raise ValueError(
            f"{recipe_path}: model.stream: the search scores every trial on the whole model held in memory; "
            f"search with model.stream: false (a smaller proxy model), then prune the winner recipe streamed"
        )
    return recipe


def _check_paths(recipe: Recipe, recipe_path: str | Path, out: Path, compile_model: bool) -> Path:
    """Before the model loads: the search folder against what the search reads; the recipe's folder."""
    base = Path(recipe_path).resolve().parent
    cal = recipe.calibration
    text = resolve_text_source(cal.dataset, cal.split, cal.data_root, base)
    reads = [Path(recipe_path)] + ([text] if isinstance(text, Path) else [])
    src = resolve_source(recipe.model.id, base)
    reads += [Path(src.path) / (src.gguf_file or "")] if Path(src.path).exists() else []
    check_search_output(out, reads, out.parent / "model" if compile_model else None)
    return base


@dataclass
class SearchProblem:
    """What the search runs on: the loaded model, its layers and budget, the windows, the speed goal."""

    recipe: Recipe
    lm: LoadedModel
    speed: SpeedBudget | None
    layers: list[int]
    goal: int
    spec: BudgetSpec
    calib: torch.Tensor
    heldout: torch.Tensor


def search_problem(recipe: Recipe, base: Path, warn: Callable[[str], None]) -> SearchProblem:
    """Load the model, resolve the serving target, check the budget, cut the calibration windows."""
    opts = recipe.allocation.search
    lm = load_model(recipe.model.id, recipe.model.dtype, recipe.model.device, base_dir=base)
    recipe, resolution = resolve_speed(recipe, lm.model, lm.adapter, print)
    speed = None
    if resolution.goal is not None:  # the search is held to the goal itself, seeded at its uniform count
        speed = SpeedBudget(resolution.latency, resolution.goal, resolution.phase, lm.adapter.num_layers)
    elif opts.objectives and opts.objectives[1] == "latency":  # a front against predicted time, no goal
        speed = pareto_speed(recipe, lm.adapter)
    layers = eligible_layers(recipe.targets, lm.adapter.num_layers, lm.adapter.layers_path)
    goal = removal_goal(recipe, lm.model, lm.adapter)
    spec = budget_spec(recipe, count=goal)
    limit = feasible_fraction(lm.model, lm.adapter, spec, layers)
    if goal > limit * decoder_linear_params(lm.model, lm.adapter):
        raise ValueError(
            f"budget.params: {goal:,} parameters cannot be removed under min_keep={spec.min_keep}; the closest "
            f"feasible budget is params: {limit:.4f}"
        )
    tokens = calibration_tokens(recipe.calibration, lm.tokenizer, base)
    # the compiler's own calibration windows: the winner compiles from the same variants (stitched), and
    # the candidates re-scored after the search are compiled exactly as `secateur prune` will (sequential)
    # held-out windows of calibration.heldout_seqlen tokens (default 256): the context the KL proxy sees.
    # Short windows flatter plans that cut attention: the latency-0.7 winner's KL was 11% below uniform's
    # on 256-token windows and 1% below on 2048-token ones (bench/results/search.md)
    seqlen = recipe.calibration.heldout_seqlen
    windows = recipe_windows(
        recipe.calibration,
        tokens,
        heldout_seqlen=seqlen,
        heldout_windows=max(1, opts.heldout_tokens // seqlen),
    )
    if windows.heldout.numel() < opts.heldout_tokens:
        warn(
            f"allocation.search.heldout_tokens: {opts.heldout_tokens} asked, the held-out tail of the "
            f"calibration text has {windows.heldout.numel()}; scoring those"
        )
    return SearchProblem(recipe, lm, speed, layers, goal, spec, windows.calib, windows.heldout)


def _run(
    p: SearchProblem,
    base: Path,
    out: Path,
    url: str | None,
    run: dict[str, Any],
    log: Callable[[str], None],
) -> SearchResult:
    """run_search on the problem; `run` holds trials, workers and progress."""
    recipe, lm, opts, trials = p.recipe, p.lm, p.recipe.allocation.search, run["trials"]
    fp = model_fingerprint(lm.model)
    out.mkdir(parents=True, exist_ok=True)
    log(
        f"search: {opts.trials if trials is None else trials} trials, storage {url}, {len(p.layers)} layers, "
        f"goal {p.goal:,} parameters"
    )
    return run_search(
        lm.model,
        lm.adapter,
        p.calib,
        p.heldout,
        p.spec,
        p.layers,
        opts,
        storage=url,
        output_dir=out,
        study_name=recipe.name or "secateur",
        n_trials=trials,
        model_fingerprint=fp,
        metric=recipe.importance.metric,
        restore=recipe.restore.method,
        damping=recipe.restore.damping,
        workers=run["workers"],
        model_factory=functools.partial(
            reload_model,
            recipe.model.id,
            recipe.model.dtype,
            recipe.model.device,
            str(base),
        ),
        progress=run["progress"],
        cache_kwargs={"weights_fp": fp, "variants_dir": recipe.allocation.variants_dir},
        compile_fn=None
        if recipe.allocation.compile == "stitched"
        else sequential_compiler(recipe, lm, p.calib),
        speed=p.speed,
    )


def _write_winner(
    p: SearchProblem, result: SearchResult, base: Path, out: Path, log: Callable[[str], None]
) -> Path:
    """winner.yaml and best_plan.json (and front.json in Pareto mode), each recorded once written."""
    recipe, lm, speed, opts = p.recipe, p.lm, p.speed, p.recipe.allocation.search
    winner = absolutize(resolved_dict(recipe), base)
    winner["name"] = f"{recipe.name or 'search'}-winner"
    winner["output"]["dir"] = str(out.parent / "model")
    if speed is not None:  # what the winner removes: a speed goal is met by a plan, not by one count
        winner["budget"]["params"] = planned_removal(lm.model, lm.adapter, result.best_plan)
        ratios = speed.ratios(result.best_plan)
        log(
            "search: winner predicted at "
            + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
            + " of dense time"
        )
    digest = hashlib.sha256(str(result.best_plan.to_dict()).encode()).hexdigest()[:12]
    winner_path = write_winner_recipe(
        winner,
        result.best_plan,
        out / "winner.yaml",
        result.space,
        note=f"best trial {result.best_trial}: {opts.objective} {result.best_value:.4f} "
        f"(uniform {result.uniform_value}); plan {digest}",
    )
    record_files([winner_path, out / "best_plan.json"])
    if result.front:
        record_files([write_front(out / "front.json", result, lm, speed)])
        log(
            f"search: Pareto front of {len(result.front)} points in {out / 'front.json'}; compile one with "
            f"`secateur prune --pick {opts.objectives[1]}=X {out}`"
        )
    return winner_path


def _summary(
    result: SearchResult, plots: list[Path], url: str | None, lm: LoadedModel, t0: float
) -> dict[str, Any]:
    """The numbers `secateur search` prints and returns."""
    return {
        "best_value": result.best_value,
        "uniform_value": result.uniform_value,
        "seeds": {k: {x: v[x] for x in v if x != "plan"} for k, v in result.seeds.items()},
        "rescored": [{x: r[x] for x in r if x != "plan"} for r in result.rescored],
        "best_trial": result.best_trial,
        "trials": len(result.trials_table),
        "seconds": time.perf_counter() - t0,
        "plots": [str(p) for p in plots],
        "storage": url,
        "variants": result.variants,
        "memory": peak_memory(lm.device),
    }


def search(
    recipe_path: str | Path,
    *,
    trials: int | None = None,
    storage: str | None = None,
    output: str | Path | None = None,
    workers: int = 1,
    overrides: tuple[str, ...] = (),
    compile_model: bool = False,
    validate: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = _warn,
) -> SearchOutcome:
    """Run (or resume) the allocation search of a recipe whose allocation.method is `search`.

    The winner recipe and best_plan.json are written as soon as the study is done; plots come
    after them, and a plot that cannot be drawn (matplotlib missing or failing) is a warning
    through `warn`, never an error that loses the search. `workers` > 1 starts processes that
    each load the recipe's model again. `validate` compiles the uniform and the winning allocation and
    measures both (and dense) on the recipe's evaluate sets: validation.md / .json in the search folder.
    """
    check_counts(trials, workers)
    recipe = _checked_recipe(recipe_path, overrides)
    out = Path(output or (Path(recipe.output.dir or "runs/search") / "search"))
    base = _check_paths(recipe, recipe_path, out, compile_model)
    url = resolve_storage(storage or recipe.allocation.search.storage, out)
    t0 = time.perf_counter()
    p = search_problem(recipe, base, warn)
    result = _run(
        p,
        base,
        out,
        url,
        {"trials": trials, "workers": workers, "progress": progress},
        log,
    )
    winner_path = _write_winner(p, result, base, out, log)
    plots: list[Path] = []
    try:  # last: the search's result is already on disk whatever happens here
        plots = write_plots(result, out)
        record_files(plots)
    except Exception as e:
        hint = " (pip install matplotlib)" if isinstance(e, ImportError) else ""
        warn(f"plots not written: {type(e).__name__}: {e}{hint}; the winner recipe is {winner_path}")
    log(seed_line(result, p.recipe.allocation.search.objective))
    summary = _summary(result, plots, url, p.lm, t0)
    if validate and not p.recipe.evaluate.enabled:
        warn("validation skipped: the recipe has evaluate.enabled: false")
    elif validate and result.uniform_plan is not None:
        from secateur.search_validate import validate_search  # the prune pipeline: see the note on top

        summary["validation"] = validate_search(
            winner_path,
            result.uniform_plan,
            result.best_plan,
            p.lm,
            p.calib,
            out,
            base,
            log=log,
        )
        summary["validation_table"] = str(out / "validation.md")
        record_files([out / "uniform.yaml", out / "validation.json", out / "validation.md"])
    elif validate:
        warn("validation skipped: the study has no completed uniform trial to compare with")
    if compile_model:
        from secateur.api import prune  # the prune pipeline: see the note on top

        prune(
            winner_path,
            output=out.parent / "model",
            overwrite=True,
            progress=progress,
            log=log,
        )
        summary["model"] = str(out.parent / "model")
    return SearchOutcome(out, winner_path, summary, result.rescored_model)
