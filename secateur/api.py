"""`prune`: recipe in, pruned model + lock + report out. Cheap checks first, heavy work last."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from secateur.checks import check_resources, check_streamable, load_skeleton, plan_stages
from secateur.export import (
    check_exports,
    check_pruned,
    export_model,
    export_name,
    recipe_tokenizer_gguf,
    tokenizer_gguf_for,
)
from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.heal_stage import Healing, check_heal_lock, check_heals, heal_after, prepare_heals
from secateur.lock import (
    LOCK_NAME,
    LockError,
    build_lock,
    check_kept_ranges,
    locked_fingerprint,
    model_fingerprint,
    read_lock,
)
from secateur.recipe.load import dump_recipe, load_recipe, recipe_from_dict, resolved_dict
from secateur.recipe.schema import Recipe
from secateur.runtime.data import (
    eval_windows,
    load_text,
    resolve_text_source,
    statistics_split,
    tokenize_text,
)
from secateur.runtime.deliver import (
    budget_slack,
    check_budget,
    check_finite_output,
    check_finite_source,
    check_perplexity,
)
from secateur.runtime.evaluate import perplexity
from secateur.runtime.export import ExportError
from secateur.runtime.io import all_layer_shapes, round_to_dtype, write_model
from secateur.runtime.loader import DTYPES, LoadedModel, hub_id, load_model, resolve_source, source_dtype
from secateur.runtime.methods import get_method
from secateur.runtime.outdir import atomic_dir, check_location, check_replaceable, clean_leftovers
from secateur.runtime.sequential import PruneResult
from secateur.runtime.speed.engines import EngineUnavailable
from secateur.runtime.stage import StageContext
from secateur.runtime.timing import measure_speed, peak_memory, speed_ratios, speed_warnings
from secateur.speed import MIN_ROUNDS, measure_pair
from secateur.speed_target import SpeedResolution, resolve_speed, target_of


@dataclass
class PruneOutcome:
    """What a prune produced: where, the report data and the lock."""

    output: Path
    report: dict[str, Any]
    lock: dict[str, Any]
    results: list[PruneResult]
    reproduced: bool | None = None
    extras: dict[str, Any] = field(default_factory=dict)


def _data_root(recipe: Recipe) -> str | None:
    return recipe.calibration.data_root


def preflight(
    recipe: Recipe,
    output: Path,
    overwrite: bool,
    base_dir: Path | None,
    recipe_path: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Recipe, tuple[list[Any], list[int], list[list[int]]], SpeedResolution]:
    """Every check that needs no weights and no data: output folder, data files, tasks, and the
    recipe against the model's shapes (a weightless skeleton), so nothing heavy starts in vain.
    Then the recipe is resolved against its serving target (`multiple_of: auto`, speed goals).

    Returns the resolved recipe, the stages, their parameter counts and eligible layers (shapes
    alone decide them), and what the resolution decided."""
    if recipe.allocation.method == "search":
        raise ValueError(
            "allocation.method: 'search' recipes run with `secateur search`, which writes a winner recipe"
        )
    if recipe.model.stream:
        check_streamable(recipe)
    cal = recipe.calibration
    read = [resolve_text_source(cal.dataset, cal.split, _data_root(recipe), base_dir)]
    if recipe.evaluate.enabled:
        for ps in recipe.evaluate.perplexity:
            read.append(resolve_text_source(ps.dataset, ps.split, _data_root(recipe), base_dir))
        if recipe.evaluate.tasks:
            from secateur.runtime.zeroshot import check_tasks

            check_tasks(recipe.evaluate.tasks, _data_root(recipe))
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


def size_of(lm: LoadedModel, context: int = 512) -> dict[str, int]:
    """Parameter and FLOP counts reported before and after."""
    return {
        "params": total_params(lm.model),
        "decoder_linear_params": decoder_linear_params(lm.model, lm.adapter),
        "flops_per_token": flops_per_token(lm.model, lm.adapter, context),
    }


def evaluate_ppl(
    recipe: Recipe, lm: LoadedModel, base_dir: Path | None, cache: dict, progress: bool | str = False
) -> dict[str, float]:
    """Perplexity on every set of `evaluate.perplexity` (tokenized once, reused for dense and pruned)."""
    out = {}
    for ps in recipe.evaluate.perplexity:
        key = f"{ps.dataset}:{ps.split}@{ps.seqlen}" + (f"[{ps.max_windows}w]" if ps.max_windows else "")
        if key not in cache:
            toks = tokenize_text(lm.tokenizer, load_text(ps.dataset, ps.split, _data_root(recipe), base_dir))
            cache[key] = eval_windows(toks, ps.seqlen, ps.max_windows)
        label = f"{progress} perplexity {key}" if isinstance(progress, str) else progress
        if lm.stream is not None:
            from secateur.runtime.stream import stream_perplexity

            out[key] = stream_perplexity(lm.stream, cache[key], label)
        else:
            out[key] = perplexity(lm.model, cache[key], batch_size=1, progress=label)
    return out


@dataclass
class _Calibration:
    """Statistics windows, held-out windows and their fingerprint."""

    calib: torch.Tensor
    heldout: torch.Tensor
    fingerprint: str


def _resolve(
    recipe_path: str | Path | None,
    recipe: Recipe | None,
    output: str | Path | None,
    overrides: Sequence[str],
    lock_path: str | Path | None,
) -> tuple[Recipe, dict[str, Any] | None, Path, Path]:
    """The recipe to run (from a file, an object or a lock), the lock data, base folder and output."""
    lock_data = None
    base_dir = Path(recipe_path).resolve().parent if recipe_path else Path.cwd()
    if lock_path is not None:
        lock_data = read_lock(lock_path)
        recipe = recipe_from_dict(lock_data["recipe"], str(lock_path))
        base_dir = Path(lock_data.get("recipe_dir") or Path(lock_path).resolve().parent)
    elif recipe is None:
        if recipe_path is None:
            raise ValueError("prune: give a recipe file or a lock")
        recipe = load_recipe(recipe_path, overrides)
    out_ref = output or recipe.output.dir
    if not out_ref:
        raise ValueError("output: no output directory; set output.dir in the recipe or pass --output")
    return recipe, lock_data, base_dir, Path(out_ref)


def _check_model_lock(
    lock_data: dict[str, Any] | None, lock_path: Any, dense_fp: str, lm: LoadedModel
) -> None:
    """A lock applies only to the model it was made from, and its indices must exist in it."""
    if lock_data is None:
        return
    check_kept_ranges(lock_data["kept"], all_layer_shapes(lm.model, lm.adapter), lock_path)
    check_lock_model(lock_data, lock_path, dense_fp)


def check_lock_model(lock_data: dict[str, Any], lock_path: Any, dense_fp: str) -> None:
    """A lock applies only to the model it was made from."""
    if lock_data["fingerprints"]["model"] != dense_fp:
        raise LockError(
            f"{lock_path}: the lock was made from another model (fingerprint {lock_data['fingerprints']['model'][:12]}"
            f"..., this model {dense_fp[:12]}...); refusing to apply it"
        )


def _calibration(
    recipe: Recipe, lm: LoadedModel, base_dir: Path, lock_data: dict[str, Any] | None, lock_path: Any
) -> _Calibration:
    """Statistics from the first 90% of the calibration text, held-out windows from the rest."""
    cal = recipe.calibration
    cal_tokens = tokenize_text(lm.tokenizer, load_text(cal.dataset, cal.split, _data_root(recipe), base_dir))
    calib, heldout_tokens = statistics_split(cal_tokens, cal.n_samples, cal.seqlen, cal.seed)
    heldout = eval_windows(heldout_tokens, min(cal.seqlen, cal.heldout_seqlen), cal.heldout_windows)
    calib_fp = hashlib.sha256(calib.numpy().tobytes() + heldout.numpy().tobytes()).hexdigest()
    if lock_data is not None and lock_data["fingerprints"]["calibration"] != calib_fp:
        raise LockError(
            f"{lock_path}: calibration data differs from the locked run (different file or tokenizer)"
        )
    return _Calibration(calib, heldout, calib_fp)


def _run_stages(
    recipe: Recipe,
    lm: LoadedModel,
    cal: _Calibration,
    plan: tuple[list[Any], list[int], list[list[int]]],
    dense_linear: int,
    progress: bool,
    log: Callable[[str], None],
    layer_io: Any = None,
    after_stage: Callable[[int, Any], None] | None = None,
) -> list[PruneResult]:
    """Run every stage in order; each aims at the cumulative target (whole sublayers overshoot).
    `after_stage(i, stage)` runs after each (healing)."""
    stages, counts, stage_layers = plan
    c = recipe.calibration
    slack = sum(
        budget_slack(lm.model, lm.adapter, layers, recipe.budget.multiple_of, unit_kinds(st.targets), c)
        for st, layers, c in zip(stages, stage_layers, counts)
    )
    results = []
    for si, (st, layers) in enumerate(zip(stages, stage_layers)):
        done = dense_linear - decoder_linear_params(lm.model, lm.adapter)
        count = max(sum(counts[: si + 1]) - done, 0)
        log(
            f"stage {si + 1}/{len(stages)}: {st.method} removes {count:,} parameters in {len(layers)} layers "
            f"(metric {st.importance.metric}, restore {st.restore.method}, calibration {c.n_samples} x {c.seqlen})"
        )
        ctx = StageContext(
            lm.model, lm.adapter, cal.calib, cal.heldout, st, recipe, count, layers, progress, log
        )
        ctx.layer_io = layer_io
        results.append(get_method(st.method).run(ctx))
        if after_stage is not None:
            after_stage(si, st)
    achieved = dense_linear - decoder_linear_params(lm.model, lm.adapter)
    check_budget(sum(counts), achieved, dense_linear, slack)
    return results


def unit_kinds(targets: Any) -> set[str]:
    """The unit kinds a stage removes: channels and heads, whole sublayers, blocks."""
    kinds = {targets.attention} - {"none"} | ({"mlp_channel"} if targets.mlp else set())
    kinds |= {"attn_sublayer", "mlp_sublayer"} if targets.sublayers else set()
    return kinds | ({"block"} if targets.blocks else set())


def _evaluate_pruned(
    recipe: Recipe,
    lm: LoadedModel,
    dense_copy: torch.nn.Module,
    base_dir: Path,
    ppl_cache: dict,
    dense_ppl: dict[str, float],
    progress: bool = True,
) -> dict[str, Any]:
    """Pruned perplexity, dense-vs-pruned speed measured alternately, and zero-shot tasks."""
    ev = recipe.evaluate
    out: dict[str, Any] = {
        "perplexity": {
            "dense": dense_ppl,
            "pruned": evaluate_ppl(recipe, lm, base_dir, ppl_cache, "pruned" if progress else False),
        }
    }
    lat = ev.latency
    speed = measure_speed(
        {"dense": dense_copy, "pruned": lm.model},
        lm.model.config.vocab_size,
        prefill_len=lat.prefill_len,
        batch_size=lat.batch_size,
        decode_tokens=lat.decode_tokens,
        repeats=lat.repeats,
        progress=progress,
    )
    out["speed"] = {name: vars(r) for name, r in speed.items()}
    out["speed"]["ratios"] = speed_ratios(speed)["pruned"]
    out["speed"]["warnings"] = speed_warnings(speed)
    out["speed"]["device"] = str(lm.device)
    out.update(engine_speed(recipe, lm, dense_copy, base_dir, progress))
    if ev.tasks:
        from secateur.runtime.zeroshot import run_zeroshot

        out["zeroshot"] = {
            "dense": run_zeroshot(dense_copy, lm.tokenizer, ev.tasks, _data_root(recipe), ev.limit),
            "pruned": run_zeroshot(lm.model, lm.tokenizer, ev.tasks, _data_root(recipe), ev.limit),
        }
    return out


def engine_speed(
    recipe: Recipe, lm: LoadedModel, dense: torch.nn.Module, base_dir: Path, progress: bool
) -> dict[str, Any]:
    """Dense vs pruned in the serving target's engine when it is not PyTorch (which `speed` already
    measured): {"engine_speed": table} or {"engine_speed_skipped": why}."""
    t = target_of(recipe)
    if t.engine == "torch":
        return {}
    if t.engine != "llama.cpp":
        return {
            "engine_speed_skipped": f"not measured in {t.engine}: measure it with `secateur speed` on its machine"
        }
    try:
        tok = tokenizer_gguf_for(lm.source, None, "report speed in llama.cpp")
        lat = recipe.evaluate.latency
        dense_lm = dataclasses.replace(lm, model=dense)
        table = measure_pair(
            dense_lm,
            lm,
            "llama.cpp",
            tok,
            rounds=max(MIN_ROUNDS, lat.repeats),
            prefill=lat.prefill_len,
            decode=lat.decode_tokens,
            threads=t.threads,
            outtype=t.quant or t.dtype,
            data_root=_data_root(recipe),
            log=print if progress else None,
        )
    except (EngineUnavailable, ExportError, ValueError) as e:
        return {"engine_speed_skipped": f"not measured in {t.engine}: {e}"}
    return {"engine_speed": table}


def _output_dtype(recipe: Recipe, lm: LoadedModel, lock_data: dict[str, Any] | None) -> torch.dtype:
    """The dtype the output is saved in: a lock's own (older locks: the working dtype, as outputs
    were saved then), else `output.dtype`, `source` being the source checkpoint's dtype."""
    if lock_data is not None:
        return DTYPES[lock_data.get("output_dtype") or lock_data["dtype"]]
    if recipe.output.dtype == "source":
        return source_dtype(lm.source)
    return DTYPES[recipe.output.dtype]


def _write_output(
    out: Path,
    overwrite: bool,
    lm: LoadedModel,
    recipe: Recipe,
    lock: dict[str, Any],
    report: dict[str, Any],
    dtype: torch.dtype,
    base_dir: Path | None = None,
) -> None:
    """Weights, recipe, lock, report, model card and the recipe's exports, written into a temporary
    sibling and renamed into place. An export the engine cannot hold is left out (the pruned model is
    still saved, the work is not lost) and reported as an error afterwards."""
    exports, refused = [], []
    for i, e in enumerate(recipe.output.export):
        try:
            where = f"output.export.{i}"
            tok = recipe_tokenizer_gguf(e, lm.source, base_dir, where) if e.format == "gguf" else None
            check_pruned(lm.model, lm.adapter, e.format, tok)
            exports.append((e, tok))
        except ExportError as err:
            refused.append(f"output.export.{i} ({e.format}): {err}")
    with atomic_dir(out, overwrite) as tmp:
        plain = write_model(lm.model, lm.adapter, tmp, lm.tokenizer, dtype, recipe.output.max_shard_size)
        write_run_files(tmp, out, lm, recipe, lock, report, plain)
        for e, tok in exports:
            export_model(
                lm.model,
                lm.adapter,
                e.format,
                tmp / export_name(e.format, e.outtype),
                outtype=e.outtype,
                tokenizer=lm.tokenizer,
                tokenizer_gguf=tok,
                name=f"{recipe.name or out.name} (pruned by Secateur)",
            )
    if refused:
        raise ExportError(f"pruned model saved to {out}, but " + "; ".join(refused))


def write_run_files(
    folder: Path,
    out: Path,
    lm: LoadedModel,
    recipe: Recipe,
    lock: dict[str, Any],
    report: dict[str, Any],
    plain: bool,
) -> None:
    """Model card, recipe, lock and report beside the weights (in-memory and streamed outputs)."""
    from secateur.runtime.card import write_card
    from secateur.runtime.report import write_report

    write_card(folder, report, out.name, hub_id(lm.source), plain)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / LOCK_NAME).write_text(yaml.safe_dump(lock, sort_keys=False))
    write_report(folder, report)


def prune(
    recipe_path: str | Path | None = None,
    *,
    recipe: Recipe | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    overrides: Sequence[str] = (),
    lock_path: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    stream: bool = False,
) -> PruneOutcome:
    """Run a recipe end to end (or re-apply a lock) and write the pruned model folder atomically
    (`stream`: as with model.stream: true, one decoder layer in memory at a time)."""
    recipe, lock_data, base_dir, out = _resolve(recipe_path, recipe, output, overrides, lock_path)
    if stream and not recipe.model.stream:
        recipe = recipe.model_copy(deep=True)
        recipe.model.stream = True
    with _locked_threads((lock_data or {}).get("threads"), log):
        return _prune(recipe, lock_data, base_dir, out, overwrite, lock_path, progress, log, recipe_path)


@contextlib.contextmanager
def _locked_threads(threads: Any, log: Callable[[str], None]) -> Iterator[None]:
    """Run with the CPU thread count a lock recorded (CPU matmuls reduce in a thread-dependent order)."""
    saved = torch.get_num_threads()
    if not (isinstance(threads, int) and threads > 0 and threads != saved):
        yield
        return
    log(f"lock: using {threads} CPU threads as the locked run did (this process had {saved})")
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _prune(
    recipe: Recipe,
    lock_data: dict[str, Any] | None,
    base_dir: Path,
    out: Path,
    overwrite: bool,
    lock_path: str | Path | None,
    progress: bool,
    log: Callable[[str], None],
    recipe_path: str | Path | None,
) -> PruneOutcome:
    """The phases of `prune` once the recipe, lock and output are known."""
    if recipe.model.stream:
        from secateur.streamed import prune_streamed

        return prune_streamed(
            recipe, lock_data, base_dir, out, overwrite, lock_path, progress, log, recipe_path
        )
    recipe, plan, speed = preflight(
        recipe, out, overwrite, base_dir, recipe_path if lock_path is None else lock_path, log
    )

    t_start = time.perf_counter()
    lm = load_model(recipe.model.id, recipe.model.dtype, recipe.model.device, base_dir=base_dir)
    t_load = time.perf_counter() - t_start
    check_finite_source(lm.model.state_dict().items(), recipe.model.id)
    dense_fp = model_fingerprint(lm.model)
    _check_model_lock(lock_data, lock_path, locked_fingerprint(lock_data, lm.model, None, dense_fp), lm)
    out_dtype = _output_dtype(recipe, lm, lock_data)
    cal = _calibration(recipe, lm, base_dir, lock_data, lock_path)

    dense_size = size_of(lm, recipe.budget.context)
    dense_layer = all_layer_shapes(lm.model, lm.adapter)[0]
    ev = recipe.evaluate
    ppl_cache: dict[str, torch.Tensor] = {}
    dense_ppl = (
        evaluate_ppl(recipe, lm, base_dir, ppl_cache, "dense" if progress else False) if ev.enabled else {}
    )
    check_perplexity({"dense": dense_ppl})
    for k, v in dense_ppl.items():
        log(f"dense perplexity {k}: {v:.3f}")
    dense_copy = copy.deepcopy(lm.model) if ev.enabled else None
    healing = prepare_heals(recipe, lm, dense_fp, base_dir, log, progress)
    check_heal_lock(lock_data, lock_path, healing)

    results = _run_stages(
        recipe,
        lm,
        cal,
        plan,
        dense_size["decoder_linear_params"],
        progress,
        log,
        after_stage=_healer(recipe, lm, healing, base_dir, ppl_cache, log, progress),
    )
    kept = kept_units(results)
    # what is evaluated and fingerprinted from here on is exactly what the output holds
    round_to_dtype(lm.model, out_dtype)
    check_finite_output(lm.model, out_dtype)
    pruned_fp = model_fingerprint(lm.model, out_dtype)
    locked = locked_fingerprint(lock_data, lm.model, out_dtype, pruned_fp)
    reproduced = check_lock_result(lock_data, lock_path, kept, locked)

    report = base_report(recipe, lm, plan, results, dense_size, dense_layer, t_load, pruned_fp, out_dtype)
    if ev.enabled:
        report.update(_evaluate_pruned(recipe, lm, dense_copy, base_dir, ppl_cache, dense_ppl, progress))
        del dense_copy
        check_perplexity(report["perplexity"])

    report["memory"] = peak_memory(lm.device)
    report["serving"] = speed.to_dict()
    lock = make_lock(recipe, results, kept, dense_fp, cal.fingerprint, report, pruned_fp)
    lock["recipe_dir"] = str(base_dir)
    if healing:
        report["heal"] = healing.entries
        report["phases"]["heal"] = sum(r.seconds for r in healing.results)
        lock["heal"] = healing.lock_entries()
    _write_output(out, overwrite, lm, recipe, lock, report, out_dtype, base_dir)
    healing.finish()
    return PruneOutcome(out, report, lock, results, reproduced)


def _healer(
    recipe: Recipe,
    lm: LoadedModel,
    healing: Healing,
    base_dir: Path,
    ppl_cache: dict,
    log: Callable[[str], None],
    progress: bool,
) -> Callable[[int, Any], None] | None:
    """The after-stage hook that heals, measuring quality just before each heal when the recipe
    evaluates (perplexity; zero-shot too before the last stage's heal)."""
    if not healing:
        return None
    ev, last = recipe.evaluate, len(recipe.stages()) - 1

    def before(si: int) -> dict[str, Any]:
        if not ev.enabled:
            return {}
        out: dict[str, Any] = {"perplexity": evaluate_ppl(recipe, lm, base_dir, ppl_cache, "before heal")}
        for k, v in out["perplexity"].items():
            log(f"perplexity before healing {k}: {v:.3f}")
        if ev.tasks and si == last:
            from secateur.runtime.zeroshot import run_zeroshot

            out["zeroshot"] = run_zeroshot(lm.model, lm.tokenizer, ev.tasks, _data_root(recipe), ev.limit)
        return out

    return lambda si, st: heal_after(si, st, lm, healing, lambda: before(si), log, progress)


def base_report(
    recipe: Recipe,
    lm: LoadedModel,
    plan: tuple[list[Any], list[int], list[list[int]]],
    results: list[PruneResult],
    dense_size: dict[str, int],
    dense_layer: dict[str, Any],
    t_load: float,
    pruned_fp: str,
    out_dtype: torch.dtype,
) -> dict[str, Any]:
    """The report's sizes, shapes, phases and logs (evaluation and memory are added after)."""
    stages, counts, _ = plan
    return {
        "recipe_yaml": dump_recipe(recipe),
        "size": {"dense": dense_size, "pruned": size_of(lm, recipe.budget.context)},
        "flops_context": recipe.budget.context,
        "layers": all_layer_shapes(lm.model, lm.adapter),
        "dense_layer": dense_layer,
        "phases": {"load": t_load, **merge_phases(results)},
        "layer_log": [vars(x) for r in results for x in r.logs],
        "stages": [
            {"method": st.method, "params_to_remove": c, **r.extra}
            for st, c, r in zip(stages, counts, results)
        ],
        "lock_fingerprint": pruned_fp,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "output_dtype": str(out_dtype).replace("torch.", ""),
    }


def make_lock(
    recipe: Recipe,
    results: list[PruneResult],
    kept: list[dict[str, Any]],
    dense_fp: str,
    calib_fp: str,
    report: dict[str, Any],
    pruned_fp: str,
) -> dict[str, Any]:
    """The lock of a finished prune."""
    return build_lock(
        resolved_dict(recipe),
        [r.plan.to_dict() if r.plan else dict(r.extra) for r in results],
        kept,
        model_fp=dense_fp,
        calib_fp=calib_fp,
        device=report["device"],
        dtype=report["dtype"],
        result_fp=pruned_fp,
        output_dtype=report["output_dtype"],
    )


def kept_units(results: list[PruneResult]) -> list[dict[str, Any]]:
    """Kept indices of every stage, as the lock records them."""
    return [{str(i): k.to_dict() for i, k in sorted(r.keep.items())} for r in results]


def check_lock_result(
    lock_data: dict[str, Any] | None, lock_path: Any, kept: list[dict[str, Any]], pruned_fp: str
) -> bool | None:
    """Whether a re-applied lock was reproduced (None: no lock); a mismatch raises before writing."""
    if lock_data is None:
        return None
    if kept != lock_data["kept"]:
        raise LockError(f"{lock_path}: the kept units differ from the lock (different numerics or versions)")
    if pruned_fp != lock_data["fingerprints"]["pruned_model"]:
        raise LockError(
            f"{lock_path}: the pruned weights differ from the locked ones (same kept units, different "
            f"numerics: versions {lock_data.get('versions')}, device {lock_data.get('device')}); nothing was written"
        )
    return True


def merge_phases(results: list[PruneResult]) -> dict[str, float]:
    """Seconds per phase, summed over stages."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.phases.items():
            out[k] = out.get(k, 0.0) + v
    return out
