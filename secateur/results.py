"""What a finished prune leaves behind: its report, its lock (and the checks of a re-applied
one), and the output folder's files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from secateur.evaluation import size_of
from secateur.export import check_pruned, export_model, export_name, recipe_tokenizer_gguf
from secateur.lock import LOCK_NAME, LockError, build_lock
from secateur.recipe.load import dump_recipe, resolved_dict
from secateur.recipe.schema import Recipe
from secateur.runtime.export import ExportError
from secateur.runtime.measure.card import write_card
from secateur.runtime.measure.report import write_report
from secateur.runtime.prune.sequential import PruneResult
from secateur.runtime.prune.stage import StagePlan
from secateur.runtime.store.io import all_layer_shapes, write_model
from secateur.runtime.store.loader import LoadedModel, hub_id
from secateur.runtime.store.outdir import atomic_dir


def base_report(
    recipe: Recipe,
    lm: LoadedModel,
    plan: StagePlan,
    results: list[PruneResult],
    dense_size: dict[str, int],
    dense_layer: dict[str, Any],
    t_load: float,
    pruned_fp: str,
    out_dtype: torch.dtype,
) -> dict[str, Any]:
    """The report's sizes, shapes, phases and logs (evaluation and memory are added after)."""
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
            for st, c, r in zip(plan.stages, plan.counts, results)
        ],
        "lock_fingerprint": pruned_fp,
        "device": str(lm.device),
        "dtype": str(lm.dtype).replace("torch.", ""),
        "output_dtype": str(out_dtype).replace("torch.", ""),
    }


def merge_phases(results: list[PruneResult]) -> dict[str, float]:
    """Seconds per phase, summed over stages."""
    out: dict[str, float] = {}
    for r in results:
        for k, v in r.phases.items():
            out[k] = out.get(k, 0.0) + v
    return out


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


def check_lock_model(lock_data: dict[str, Any], lock_path: str | Path | None, dense_fp: str) -> None:
    """A lock applies only to the model it was made from."""
    if lock_data["fingerprints"]["model"] != dense_fp:
        raise LockError(
            f"{lock_path}: the lock was made from another model (fingerprint {lock_data['fingerprints']['model'][:12]}"
            f"..., this model {dense_fp[:12]}...); refusing to apply it"
        )


def check_lock_result(
    lock_data: dict[str, Any] | None, lock_path: str | Path | None, kept: list[dict[str, Any]], pruned_fp: str
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


def write_output(
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
            check_pruned(lm.model, lm.adapter, e.format, tok, e.outtype, report.get("dense_layer"))
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
                dense_layer=report.get("dense_layer"),
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
    write_card(folder, report, out.name, hub_id(lm.source), plain)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    (folder / LOCK_NAME).write_text(yaml.safe_dump(lock, sort_keys=False))
    write_report(folder, report)
