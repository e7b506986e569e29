"""Healing inside the prune pipeline: data and teacher targets from the dense model before the
first stage, a heal after each stage that asks for one (with the quality just before it, so the
report shows what healing bought), and the lock's record of the data each heal trained on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateur.lock import LockError
from secateur.recipe.schema import Recipe, Stage
from secateur.runtime.heal.run import HealPrep, check_heal_data, finish, heal_model, prepare
from secateur.runtime.heal.train import HealResult
from secateur.runtime.store.data import resolve_text_source
from secateur.runtime.store.fingerprint import model_fingerprint
from secateur.runtime.store.io import all_layer_shapes
from secateur.runtime.store.loader import LoadedModel


def _where(stage: Stage, recipe: Recipe) -> str:
    last = stage.path == ("passes", len(recipe.passes) - 1) and recipe.heal is not None
    return "heal" if not stage.path or last else f"passes.{stage.path[1]}.heal"


def check_heals(recipe: Recipe, base_dir: Path | None) -> None:
    """Preflight: every heal's text exists and is none of the recipe's evaluation sets."""
    root = recipe.calibration.data_root
    evaluated = [resolve_text_source(p.dataset, p.split, root, base_dir) for p in recipe.evaluate.perplexity]
    for st in recipe.stages():
        if st.heal is not None:
            check_heal_data(
                st.heal, _where(st, recipe), root, base_dir, evaluated if recipe.evaluate.enabled else []
            )


@dataclass
class Healing:
    """The heals of one run: prepared inputs per stage, results for report and lock."""

    preps: dict[int, HealPrep] = field(default_factory=dict)
    dense_shapes: list[dict[str, Any]] = field(default_factory=list)
    results: list[HealResult] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.preps)

    def lock_entries(self) -> list[dict[str, Any]]:
        return [
            {
                "after_stage": e["after_stage"],
                "data_fingerprint": e["data"]["fingerprint"],
                "steps": e["steps"],
            }
            for e in self.entries
        ]

    def finish(self) -> None:
        """The output is saved: drop the heal checkpoints."""
        for r in self.results:
            finish(r)


def prepare_heals(
    recipe: Recipe,
    lm: LoadedModel,
    dense_fp: str,
    base_dir: Path | None,
    log: Callable[[str], None],
    progress: bool,
) -> Healing:
    """Training text and teacher targets for every stage that heals, from the dense model."""
    h = Healing()
    for si, st in enumerate(recipe.stages()):
        if st.heal is not None:
            h.preps[si] = prepare(
                st.heal,
                lm.model,
                lm.tokenizer,
                dense_fp,
                recipe.calibration.data_root,
                base_dir,
                log,
                progress,
            )
    if h:
        h.dense_shapes = all_layer_shapes(lm.model, lm.adapter)
    return h


def heal_after(
    si: int,
    stage: Stage,
    lm: LoadedModel,
    healing: Healing,
    before: Callable[[], dict[str, Any]],
    log: Callable[[str], None],
    progress: bool,
) -> None:
    """Heal after stage `si` if it asks for it; `before()` measures the quality just before."""
    if stage.heal is None:
        return
    prep = healing.preps[si]
    shapes = all_layer_shapes(lm.model, lm.adapter)
    pruned = {i for i, (a, b) in enumerate(zip(shapes, healing.dense_shapes)) if a != b}
    quality = before()
    result = heal_model(
        lm.model,
        lm.adapter.layers(lm.model),
        stage.heal,
        prep,
        model_fingerprint(lm.model),
        pruned,
        log,
        progress,
    )
    healing.results.append(result)
    entry = {"after_stage": si + 1, "config": stage.heal.model_dump(), "data": prep.data, "before": quality}
    healing.entries.append(entry | result.to_dict())


def check_heal_lock(lock_data: dict[str, Any] | None, lock_path: Any, healing: Healing) -> None:
    """A re-applied lock must heal on the very text the locked run healed on."""
    if lock_data is None or "heal" not in lock_data:
        return
    for want, prep in zip(lock_data["heal"], healing.preps.values()):
        if want["data_fingerprint"] != prep.data["fingerprint"]:
            raise LockError(
                f"{lock_path}: the heal text after stage {want['after_stage']} differs from the locked run's "
                f"(sha256 {prep.data['fingerprint'][:12]} vs {want['data_fingerprint'][:12]}): a different "
                "device, dtype or data file; refusing to apply it"
            )
