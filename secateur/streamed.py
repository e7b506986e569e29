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
    _output_dtype,
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
from secateur.lock import LockError, check_kept_ranges
from secateur.recipe.schema import Recipe
from secateur.runtime.deliver import check_finite_source, check_perplexity
from secateur.runtime.io import all_layer_shapes, write_metadata
from secateur.runtime.loader import load_model
from secateur.runtime.outdir import atomic_dir
from secateur.runtime.stream import ShardWriter, StreamPass, memory_bound
from secateur.runtime.timing import peak_memory
from secateur.runtime.weights import SafetensorsSource


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
    if lock_data is not None and lock_data.get("lock_version") == 1:
        raise LockError(
            f"{lock_path}: lock_version 1 fingerprints hash the whole model in one pass, which streaming "
            "cannot compute layer by layer; re-apply it without --stream / model.stream (the output then "
            "carries a version 2 lock that streams)"
        )
    recipe, plan, speed = preflight(
        recipe, out, overwrite, base_dir, recipe_path if lock_path is None else lock_path, log
    )
    t_start = time.perf_counter()
    lm = load_model(recipe.model.id, recipe.model.dtype, recipe.model.device, base_dir, stream=True)
    t_load = time.perf_counter() - t_start
    check_finite_source(lm.model.state_dict().items(), recipe.model.id)  # resident tensors; layers as read
    if lock_data is not None:
        check_kept_ranges(lock_data["kept"], all_layer_shapes(lm.model, lm.adapter), lock_path)
    out_dtype = _output_dtype(recipe, lm, lock_data)
    cal = _calibration(recipe, lm, base_dir, lock_data, lock_path)
    dense_size = size_of(lm, recipe.budget.context)
    dense_layer = all_layer_shapes(lm.model, lm.adapter)[0]
    c = recipe.calibration
    bound = memory_bound(
        lm.model, lm.adapter, lm.dtype, c.n_samples * c.seqlen, plan[0][0].restore.error_correction > 0
    )
    ev = recipe.evaluate
    ppl_cache: dict[str, torch.Tensor] = {}
    t = time.perf_counter()
    dense_ppl = (
        evaluate_ppl(recipe, lm, base_dir, ppl_cache, "dense" if progress else False) if ev.enabled else {}
    )
    t_dense_eval = time.perf_counter() - t
    check_perplexity({"dense": dense_ppl})
    for k, v in dense_ppl.items():
        log(f"dense perplexity {k}: {v:.3f}")

    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, out_dtype, recipe.output.max_shard_size)
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
        # the shards hold the weights in the output dtype; the pruned model is evaluated as saved
        pruned_fp = writer.fingerprint.hexdigest()
        reproduced = check_lock_result(lock_data, lock_path, kept, pruned_fp)
        report = base_report(recipe, lm, plan, results, dense_size, dense_layer, t_load, pruned_fp, out_dtype)
        report["stream"] = {"shards": writer.n, "dense_eval_s": t_dense_eval, "memory_bound_bytes": bound}
        if ev.enabled:
            t = time.perf_counter()
            lm.stream.round_resident(out_dtype)
            lm.stream.source = SafetensorsSource(tmp)  # the pruned layers, as just written
            pruned = evaluate_ppl(recipe, lm, base_dir, ppl_cache, "pruned" if progress else False)
            report["perplexity"] = {"dense": dense_ppl, "pruned": pruned}
            check_perplexity(report["perplexity"])
            report["stream"]["pruned_eval_s"] = time.perf_counter() - t
        report["memory"] = peak_memory(lm.device)
        report["serving"] = speed.to_dict()
        lock = make_lock(recipe, results, kept, dense_fp, cal.fingerprint, report, pruned_fp)
        lock["recipe_dir"] = str(base_dir)
        plain = write_metadata(lm.model, lm.adapter, tmp, lm.tokenizer, out_dtype)
        write_run_files(tmp, out, lm, recipe, lock, report, plain)
    return PruneOutcome(out, report, lock, results, reproduced)
