"""The prune pipeline: named phases over one run object.

`Pipeline.execute` runs preflight, load, calibrate, evaluate_dense, prepare_heal, then inside
`output`: run_stages (each stage followed by `heal` when it asks for one), fingerprint, report,
evaluate, seal and write. Each phase reads and fills a `PruneRun`. The streamed prune
(`secateur.streamed.StreamedPipeline`) overrides only the phases it changes.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from secateur.checks import check_resources, check_streamable, load_skeleton, plan_stages
from secateur.evaluation import evaluate_ppl, evaluate_pruned, size_of
from secateur.export import check_exports
from secateur.graph.count import decoder_linear_params
from secateur.heal_stage import Healing, check_heal_lock, check_heals, heal_after, prepare_heals
from secateur.lock import LockError, check_kept_ranges, locked_fingerprint, model_fingerprint
from secateur.recipe.schema import Recipe, Stage, Targets
from secateur.results import (
    base_report,
    check_lock_model,
    check_lock_result,
    kept_units,
    make_lock,
    write_output,
)
from secateur.runtime.measure.timing import peak_memory
from secateur.runtime.measure.zeroshot import check_tasks, run_zeroshot
from secateur.runtime.methods import get_method
from secateur.runtime.prune.sequential import LayerIO, PruneResult
from secateur.runtime.prune.stage import StageContext, StagePlan
from secateur.runtime.store.data import (
    CalibrationWindows,
    calibration_tokens,
    recipe_windows,
    resolve_text_source,
)
from secateur.runtime.store.deliver import (
    budget_slack,
    check_budget,
    check_finite_output,
    check_finite_source,
    check_perplexity,
)
from secateur.runtime.store.io import all_layer_shapes, round_to_dtype
from secateur.runtime.store.loader import DTYPES, LoadedModel, load_model, resolve_source, source_dtype
from secateur.runtime.store.outdir import check_location, check_replaceable, clean_leftovers
from secateur.speed_target import SpeedResolution, resolve_speed


@dataclass
class PruneOutcome:
    """What a prune produced: where, the report data and the lock."""

    output: Path
    report: dict[str, Any]
    lock: dict[str, Any]
    results: list[PruneResult]
    reproduced: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneRun:
    """One prune: what it was asked (first block) and what its phases found so far (the rest)."""

    recipe: Recipe
    base_dir: Path
    out: Path
    overwrite: bool = False
    progress: bool = True
    log: Callable[[str], None] = print
    lock_data: dict[str, Any] | None = None  # a lock being re-applied
    lock_path: str | Path | None = None
    recipe_path: str | Path | None = None
    plan: StagePlan | None = None  # preflight
    speed: SpeedResolution | None = None
    lm: LoadedModel | None = None  # load
    t_load: float = 0.0
    dense_fp: str = ""
    out_dtype: torch.dtype = torch.float32
    windows: CalibrationWindows | None = None  # calibrate
    calib_fp: str = ""
    dense_size: dict[str, int] = field(default_factory=dict)  # evaluate_dense
    dense_layer: dict[str, Any] = field(default_factory=dict)
    ppl_cache: dict[str, torch.Tensor] = field(default_factory=dict)
    dense_ppl: dict[str, float] = field(default_factory=dict)
    dense_eval_s: float = 0.0
    dense_copy: torch.nn.Module | None = None
    healing: Healing = field(default_factory=Healing)  # prepare_heal
    layer_io: LayerIO | None = None  # output (streamed: the shard writer's pass)
    results: list[PruneResult] = field(default_factory=list)  # run_stages
    kept: list[dict[str, Any]] = field(default_factory=list)  # fingerprint
    pruned_fp: str = ""
    reproduced: bool | None = None
    report: dict[str, Any] = field(default_factory=dict)  # report, evaluate, seal
    lock: dict[str, Any] = field(default_factory=dict)  # seal

    def outcome(self) -> PruneOutcome:
        return PruneOutcome(self.out, self.report, self.lock, self.results, self.reproduced)


def preflight(
    recipe: Recipe,
    output: Path,
    overwrite: bool,
    base_dir: Path | None,
    recipe_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Recipe, StagePlan, SpeedResolution]:
    """Every check that needs no weights and no data: output folder, data files, tasks, and the
    recipe against the model's shapes (a weightless skeleton), so nothing heavy starts in vain.
    Then the recipe is resolved against its serving target (`multiple_of: auto`, speed goals).

    Returns the resolved recipe, its stage plan (shapes alone decide it), and what the resolution
    decided."""
    if recipe.allocation.method == "search":
        raise ValueError(
            "allocation.method: 'search' recipes run with `secateur search`, which writes a winner recipe"
        )
    if recipe.model.stream:
        check_streamable(recipe)
    cal, root = recipe.calibration, recipe.calibration.data_root
    read = [resolve_text_source(cal.dataset, cal.split, root, base_dir)]
    if recipe.evaluate.enabled:
        for ps in recipe.evaluate.perplexity:
            read.append(resolve_text_source(ps.dataset, ps.split, root, base_dir))
        if recipe.evaluate.tasks:
            check_tasks(recipe.evaluate.tasks, root)
    src = resolve_source(recipe.model.id, base_dir)
    read += [Path(src.path)] if Path(src.path).exists() else []
    read += [Path(recipe_path)] if recipe_path else []
    check_location(output, [Path(r) for r in read if isinstance(r, Path)])
    clean_leftovers(output)  # first: it may put back an output a killed run had moved aside
    check_replaceable(output, overwrite)
    model, adapter = load_skeleton(recipe.model.id, base_dir)
    for line in check_resources(recipe, adapter):
        (log or print)(line)
    check_exports(recipe, adapter, base_dir)
    check_heals(recipe, base_dir)
    recipe, speed = resolve_speed(recipe, model, adapter, log)
    return recipe, plan_stages(recipe, model, adapter), speed


def output_dtype(recipe: Recipe, lm: LoadedModel, lock_data: dict[str, Any] | None) -> torch.dtype:
    """The dtype the output is saved in: a lock's own (older locks: the working dtype, as outputs
    were saved then), else `output.dtype`, `source` being the source checkpoint's dtype."""
    if lock_data is not None:
        return DTYPES[lock_data.get("output_dtype") or lock_data["dtype"]]
    if recipe.output.dtype == "source":
        return source_dtype(lm.source)
    return DTYPES[recipe.output.dtype]


def unit_kinds(targets: Targets) -> set[str]:
    """The unit kinds a stage removes: channels and heads, whole sublayers, blocks."""
    kinds = {targets.attention} - {"none"} | ({"mlp_channel"} if targets.mlp else set())
    kinds |= {"attn_sublayer", "mlp_sublayer"} if targets.sublayers else set()
    return kinds | ({"block"} if targets.blocks else set())


def prune_stages(run: PruneRun, after_stage: Callable[[int, Stage], None] | None = None) -> list[PruneResult]:
    """Run every stage in order; each aims at the cumulative target (whole sublayers overshoot).
    `after_stage(i, stage)` runs after each (healing)."""
    recipe, lm, plan, log = run.recipe, run.lm, run.plan, run.log
    dense_linear = run.dense_size["decoder_linear_params"]
    slack = sum(
        budget_slack(lm.model, lm.adapter, layers, recipe.budget.multiple_of, unit_kinds(st.targets), c)
        for st, c, layers in plan
    )
    c = recipe.calibration
    results = []
    for si, (st, _, layers) in enumerate(plan):
        done = dense_linear - decoder_linear_params(lm.model, lm.adapter)
        count = max(sum(plan.counts[: si + 1]) - done, 0)
        log(
            f"stage {si + 1}/{len(plan.stages)}: {st.method} removes {count:,} parameters in {len(layers)} layers "
            f"(metric {st.importance.metric}, restore {st.restore.method}, calibration {c.n_samples} x {c.seqlen})"
        )
        ctx = StageContext(
            model=lm.model,
            adapter=lm.adapter,
            calib=run.windows.calib,
            heldout=run.windows.heldout,
            stage=st,
            recipe=recipe,
            params_to_remove=count,
            layers=layers,
            progress=run.progress,
            log=log,
            layer_io=run.layer_io,
        )
        results.append(get_method(st.method).run(ctx))
        if after_stage is not None:
            after_stage(si, st)
    achieved = dense_linear - decoder_linear_params(lm.model, lm.adapter)
    check_budget(sum(plan.counts), achieved, dense_linear, slack)
    return results


class Pipeline:
    """`prune`'s phases in order over one `PruneRun`, the model held in memory."""

    stream = False  # load the model as a streaming skeleton

    def execute(self, run: PruneRun) -> PruneOutcome:
        self.preflight(run)
        self.load(run)
        self.calibrate(run)
        self.evaluate_dense(run)
        self.prepare_heal(run)
        with self.output(run):
            self.run_stages(run)
            self.fingerprint(run)
            self.report(run)
            self.evaluate(run)
            self.seal(run)
            self.write(run)
        run.healing.finish()
        return run.outcome()

    def preflight(self, run: PruneRun) -> None:
        """Checks that need no weights; the recipe resolved, the stages planned."""
        checked = run.recipe_path if run.lock_path is None else run.lock_path
        run.recipe, run.plan, run.speed = preflight(
            run.recipe, run.out, run.overwrite, run.base_dir, checked, run.log
        )

    def load(self, run: PruneRun) -> None:
        """The model, its finiteness, the lock's claim on it, and the output dtype."""
        m = run.recipe.model
        t_start = time.perf_counter()
        run.lm = load_model(m.id, m.dtype, m.device, base_dir=run.base_dir, stream=self.stream)
        run.t_load = time.perf_counter() - t_start
        check_finite_source(run.lm.model.state_dict().items(), m.id)  # streamed: resident tensors
        self.check_lock_model(run)
        run.out_dtype = output_dtype(run.recipe, run.lm, run.lock_data)

    def check_lock_model(self, run: PruneRun) -> None:
        """A lock applies only to the model it was made from, and its indices must exist in it."""
        lm = run.lm
        run.dense_fp = model_fingerprint(lm.model)
        if run.lock_data is None:
            return
        check_kept_ranges(run.lock_data["kept"], all_layer_shapes(lm.model, lm.adapter), run.lock_path)
        locked = locked_fingerprint(run.lock_data, lm.model, None, run.dense_fp)
        check_lock_model(run.lock_data, run.lock_path, locked)

    def calibrate(self, run: PruneRun) -> None:
        """Calibration windows and their fingerprint (a lock's must match)."""
        tokens = calibration_tokens(run.recipe.calibration, run.lm.tokenizer, run.base_dir)
        run.windows = recipe_windows(run.recipe.calibration, tokens)
        w = run.windows
        run.calib_fp = hashlib.sha256(w.calib.numpy().tobytes() + w.heldout.numpy().tobytes()).hexdigest()
        if run.lock_data is not None and run.lock_data["fingerprints"]["calibration"] != run.calib_fp:
            raise LockError(
                f"{run.lock_path}: calibration data differs from the locked run (different file or tokenizer)"
            )

    def evaluate_dense(self, run: PruneRun) -> None:
        """Dense sizes and perplexity (and a dense copy to time against, in memory)."""
        recipe, lm = run.recipe, run.lm
        run.dense_size = size_of(lm, recipe.budget.context)
        run.dense_layer = all_layer_shapes(lm.model, lm.adapter)[0]
        enabled = recipe.evaluate.enabled
        t = time.perf_counter()
        label = "dense" if run.progress else False
        run.dense_ppl = evaluate_ppl(recipe, lm, run.base_dir, run.ppl_cache, label) if enabled else {}
        run.dense_eval_s = time.perf_counter() - t
        check_perplexity({"dense": run.dense_ppl})
        for k, v in run.dense_ppl.items():
            run.log(f"dense perplexity {k}: {v:.3f}")
        run.dense_copy = copy.deepcopy(lm.model) if enabled and not self.stream else None

    @contextlib.contextmanager
    def output(self, run: PruneRun) -> Iterator[None]:
        """What the pruning phases write into as they go (in memory: nothing until `write`)."""
        yield

    def prepare_heal(self, run: PruneRun) -> None:
        """Training text and teacher targets, from the dense model, for every stage that heals."""
        run.healing = prepare_heals(run.recipe, run.lm, run.dense_fp, run.base_dir, run.log, run.progress)
        check_heal_lock(run.lock_data, run.lock_path, run.healing)

    def run_stages(self, run: PruneRun) -> None:
        """Every stage of the plan, in order, on the model, each healed after when it asks."""
        run.results = prune_stages(run, (lambda si, st: self.heal(run, si, st)) if run.healing else None)

    def heal(self, run: PruneRun, si: int, stage: Stage) -> None:
        """Heal after stage `si` if it asks, measuring quality just before when the recipe evaluates
        (perplexity; zero-shot too before the last stage's heal)."""
        recipe, lm, log = run.recipe, run.lm, run.log
        ev, last = recipe.evaluate, len(recipe.stages()) - 1

        def before() -> dict[str, Any]:
            if not ev.enabled:
                return {}
            ppl = evaluate_ppl(recipe, lm, run.base_dir, run.ppl_cache, "before heal")
            out: dict[str, Any] = {"perplexity": ppl}
            for k, v in ppl.items():
                log(f"perplexity before healing {k}: {v:.3f}")
            if ev.tasks and si == last:
                root = recipe.calibration.data_root
                out["zeroshot"] = run_zeroshot(lm.model, lm.tokenizer, ev.tasks, root, ev.limit)
            return out

        heal_after(si, stage, lm, run.healing, before, log, run.progress)

    def fingerprint(self, run: PruneRun) -> None:
        """The pruned weights rounded to the output dtype, checked, fingerprinted, held to a lock."""
        lm = run.lm
        run.kept = kept_units(run.results)
        # what is evaluated and fingerprinted from here on is exactly what the output holds
        round_to_dtype(lm.model, run.out_dtype)
        check_finite_output(lm.model, run.out_dtype)
        run.pruned_fp = model_fingerprint(lm.model, run.out_dtype)
        locked = locked_fingerprint(run.lock_data, lm.model, run.out_dtype, run.pruned_fp)
        run.reproduced = check_lock_result(run.lock_data, run.lock_path, run.kept, locked)

    def report(self, run: PruneRun) -> None:
        """Sizes, shapes, phases and logs of the pruned model."""
        run.report = base_report(
            run.recipe,
            run.lm,
            run.plan,
            run.results,
            run.dense_size,
            run.dense_layer,
            run.t_load,
            run.pruned_fp,
            run.out_dtype,
        )

    def evaluate(self, run: PruneRun) -> None:
        """Pruned perplexity, speed and tasks beside the dense ones."""
        if not run.recipe.evaluate.enabled:
            return
        run.report.update(
            evaluate_pruned(
                run.recipe, run.lm, run.dense_copy, run.base_dir, run.ppl_cache, run.dense_ppl, run.progress
            )
        )
        run.dense_copy = None
        check_perplexity(run.report["perplexity"])

    def seal(self, run: PruneRun) -> None:
        """Memory and serving target in the report, then the lock of the finished run."""
        run.report["memory"] = peak_memory(run.lm.device)
        run.report["serving"] = run.speed.to_dict()
        run.lock = make_lock(
            run.recipe, run.results, run.kept, run.dense_fp, run.calib_fp, run.report, run.pruned_fp
        )
        run.lock["recipe_dir"] = str(run.base_dir)
        if run.healing:
            run.report["heal"] = run.healing.entries
            run.report["phases"]["heal"] = sum(r.seconds for r in run.healing.results)
            run.lock["heal"] = run.healing.lock_entries()

    def write(self, run: PruneRun) -> None:
        """The output folder, atomically."""
        write_output(
            run.out, run.overwrite, run.lm, run.recipe, run.lock, run.report, run.out_dtype, run.base_dir
        )
