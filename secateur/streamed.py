"""`prune` with `model.stream: true`: layers read one at a time, the output written shard by shard.

Only the embeddings, final norm and head stay in memory; each decoder layer is read from the
source, pruned, run on the calibration activations and written to its own shard of the (atomic)
output folder before the next one is read. Perplexity before and after streams the same way.
Methods and options that need the whole model at once refuse before anything loads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secateur.api import (
    PruneOutcome,
    _calibration,
    _run_stages,
    base_report,
    check_lock_model,
    check_lock_result,
    evaluate_ppl,
    kept_units,
    make_lock,
    preflight,
    size_of,
    write_run_files,
)
from secateur.lock import check_kept_ranges
from secateur.recipe.schema import Recipe
from secateur.runtime.io import all_layer_shapes, write_metadata
from secateur.runtime.methods import get_method
from secateur.runtime.outdir import atomic_dir
from secateur.runtime.stream import ShardWriter, StreamPass, load_streamed
from secateur.runtime.timing import peak_memory
from secateur.runtime.weights import SafetensorsSource

# why a method cannot stream (methods registered with streams=True need no entry)
WHOLE_MODEL_REASONS = {
    "bonsai": "it scores perturbed sub-models by running the whole model many times",
    "blockpruner": "its candidate scoring runs the whole model once per candidate block",
    "sprint": "its candidate scoring runs the whole model once per candidate block",
    "cfsp": "its proportional allocation needs every layer's importance before the first layer is pruned",
    "flap": "its global ranking needs every layer's statistics before the first layer is pruned",
}


class StreamError(ValueError):
    """A recipe that cannot run with model.stream, named by its key."""


def check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, what needs the whole model at once."""
    stages = recipe.stages()
    if len(stages) > 1:
        raise StreamError(
            f"model.stream: a recipe with {len(stages)} passes cannot stream (each pass would need the "
            f"previous one's whole output); run the passes as separate prunes, or set model.stream: false"
        )
    method = stages[0].method
    if not get_method(method).streams:
        why = WHOLE_MODEL_REASONS.get(method, "it needs the whole model in memory")
        raise StreamError(
            f"model.stream: method {method!r} cannot stream: {why}; use method fasp, or set model.stream: false"
        )
    if recipe.allocation.method not in ("uniform", "table"):
        raise StreamError(
            f"model.stream: allocation.method {recipe.allocation.method!r} needs every layer's statistics "
            f"before pruning; streaming supports 'uniform' and 'table'"
        )
    if recipe.evaluate.enabled and recipe.evaluate.tasks:
        raise StreamError(
            "model.stream: evaluate.tasks (zero-shot) needs the whole model; set evaluate.tasks: [] and run "
            "`secateur eval` on the output where it fits in memory"
        )


def prune_streamed(
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
    """The streaming counterpart of api._prune: same checks, same report and lock, sharded output."""
    check_streamable(recipe)
    plan = preflight(recipe, out, overwrite, base_dir, recipe_path if lock_path is None else lock_path)
    t_start = time.perf_counter()
    lm = load_streamed(recipe.model.id, recipe.model.dtype, recipe.model.device, base_dir)
    t_load = time.perf_counter() - t_start
    if lock_data is not None:
        check_kept_ranges(lock_data["kept"], all_layer_shapes(lm.model, lm.adapter), lock_path)
    cal = _calibration(recipe, lm, base_dir, lock_data, lock_path)
    dense_size = size_of(lm, recipe.budget.context)
    dense_layer = all_layer_shapes(lm.model, lm.adapter)[0]
    ev = recipe.evaluate
    ppl_cache: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    dense_ppl = (
        evaluate_ppl(recipe, lm, base_dir, ppl_cache, "dense" if progress else False) if ev.enabled else {}
    )
    t_dense_eval = time.perf_counter() - t
    for k, v in dense_ppl.items():
        log(f"dense perplexity {k}: {v:.3f}")

    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, lm.adapter.num_layers + 1)
        results = _run_stages(
            recipe,
            lm,
            cal,
            plan,
            dense_size["decoder_linear_params"],
            progress,
            log,
            StreamPass(lm.stream, writer),
        )
        writer.write(lm.stream.resident_state())
        writer.finish()
        dense_fp = lm.stream.dense_fingerprint.hexdigest()
        if lock_data is not None:
            check_lock_model(lock_data, lock_path, dense_fp)
        kept = kept_units(results)
        pruned_fp = writer.fingerprint.hexdigest()
        reproduced = check_lock_result(lock_data, lock_path, kept, pruned_fp)
        report = base_report(recipe, lm, plan, results, dense_size, dense_layer, t_load, pruned_fp)
        report["stream"] = {"shards": writer.n, "dense_eval_s": t_dense_eval}
        if ev.enabled:
            t = time.perf_counter()
            lm.stream.source = SafetensorsSource(tmp)  # the pruned layers, as just written
            pruned = evaluate_ppl(recipe, lm, base_dir, ppl_cache, "pruned" if progress else False)
            report["perplexity"] = {"dense": dense_ppl, "pruned": pruned}
            report["stream"]["pruned_eval_s"] = time.perf_counter() - t
        report["memory"] = peak_memory(lm.device)
        lock = make_lock(recipe, results, kept, dense_fp, cal.fingerprint, report, pruned_fp)
        lock["recipe_dir"] = str(base_dir)
        write_metadata(lm.model, lm.adapter, tmp, lm.tokenizer)
        write_run_files(tmp, recipe, lock, report)
    return PruneOutcome(out, report, lock, results, reproduced)
