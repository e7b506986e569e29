"""The search's own check: the winner against uniform at the same budget and restoration, on the
recipe's `evaluate` sets (perplexity, zero-shot tasks), dense beside them.

A held-out KL that improved says little by itself (a 30-dimension search can fit its proxy); what
a user decides on is test perplexity and task accuracy of the model that will be built. Both
allocations are compiled the way the recipe compiles: stitched from the same stored variants the
search scored, or pruned sequentially through `secateur.api.prune` into a temporary folder.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from secateur.api import prune
from secateur.evaluation import evaluate_ppl
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan
from secateur.recipe.load import load_recipe
from secateur.recipe.schema import Recipe
from secateur.runtime.allocation.variant_build import prune_stitched
from secateur.runtime.measure.zeroshot import run_zeroshot
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.leftovers import partial_dir
from secateur.runtime.store.loader import LoadedModel


def uniform_recipe_file(winner_path: Path, dest: Path) -> Path:
    """The winner recipe with its allocation table replaced by `uniform` (compile mode kept)."""
    doc = yaml.safe_load(winner_path.read_text())
    alloc = doc.get("allocation", {})
    doc["allocation"] = {k: v for k, v in alloc.items() if k in ("compile", "variants_dir")}
    doc["allocation"]["method"] = "uniform"
    doc["name"] = f"{doc.get('name', 'search')}-uniform"
    dest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def _measure(
    recipe: Recipe, lm: LoadedModel, model: torch.nn.Module, base: Path, cache: dict, label: str
) -> dict:
    ev = recipe.evaluate
    out: dict[str, Any] = {
        "decoder_linear_params": decoder_linear_params(model, lm.adapter),
        "perplexity": evaluate_ppl(recipe, replace(lm, model=model, stream=None), base, cache, label),
    }
    if ev.tasks:
        res = run_zeroshot(model, lm.tokenizer, list(ev.tasks), recipe.calibration.data_root, ev.limit)
        out["zeroshot"] = {t: m["acc"] for t, m in res.items()}
    return out


def _compiled(
    recipe: Recipe,
    lm: LoadedModel,
    calib: torch.Tensor,
    plan: Plan,
    recipe_file: Path,
    log: Callable[[str], None],
) -> torch.nn.Module:
    """The model `recipe_file` builds: stitched from the variant store, or pruned sequentially."""
    if recipe.allocation.compile == "stitched":
        m = copy.deepcopy(lm.model)
        prune_stitched(m, lm.adapter, calib, plan, recipe.allocation.variants_dir, progress=False)
        return m
    with partial_dir(prefix="secateur-validate-", purpose="search validation model") as tmp:
        prune(
            recipe_file,
            output=Path(tmp) / "model",
            overrides=["evaluate.enabled=false"],
            log=log,
            progress=False,
        )
        return load_pruned(Path(tmp) / "model", dtype=lm.dtype, device=lm.device)


def validate_search(
    winner_path: Path,
    uniform_plan: Plan,
    best_plan: Plan,
    lm: LoadedModel,
    calib: torch.Tensor,
    out: Path,
    base: Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure dense, uniform and searched on the recipe's evaluate sets; write validation.json/.md."""
    recipe = load_recipe(winner_path)
    uniform_file = uniform_recipe_file(winner_path, out / "uniform.yaml")
    cache: dict = {}
    rows = {"dense": _measure(recipe, lm, lm.model, base, cache, "dense")}
    for name, plan, path in (("uniform", uniform_plan, uniform_file), ("searched", best_plan, winner_path)):
        log(f"validation: compiling the {name} allocation ({recipe.allocation.compile})")
        model = _compiled(recipe, lm, calib, plan, path, log)
        rows[name] = _measure(recipe, lm, model, base, cache, name)
        del model
    (out / "validation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "validation.md").write_text(validation_table(rows) + "\n")
    return rows


def _mean(z: dict[str, float] | None) -> float | None:
    return None if not z else sum(z.values()) / len(z)


def validation_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, a column per perplexity set, the zero-shot mean, change vs uniform."""
    sets = list(rows["dense"]["perplexity"])
    head = ["model", "decoder linear params", *[f"ppl {s}" for s in sets]]
    zs = "zeroshot" in rows["dense"]
    if zs:
        head.append("zero-shot mean")
    head.append("ppl vs uniform")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    uni = rows.get("uniform", {}).get("perplexity", {})
    first = sets[0] if sets else None
    for name, r in rows.items():
        cells = [name, f"{r['decoder_linear_params']:,}", *[f"{r['perplexity'][s]:.3f}" for s in sets]]
        if zs:
            cells.append(f"{_mean(r.get('zeroshot')):.4f}")
        change = (
            f"{(r['perplexity'][first] / uni[first] - 1) * 100:+.1f}%"
            if first and first in uni and name != "dense"
            else ""
        )
        cells.append(change)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
