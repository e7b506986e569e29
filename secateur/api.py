"""`prune`: recipe in, pruned model + lock + report out. Cheap checks first, heavy work last.

The phases themselves live in `secateur.pipeline` (in memory) and `secateur.streamed` (one layer
at a time); this module resolves what to run and picks the pipeline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from secateur.lock import read_lock
from secateur.pipeline import Pipeline, PruneOutcome, PruneRun
from secateur.recipe.load import load_recipe, recipe_from_dict
from secateur.recipe.schema import Recipe
from secateur.streamed import StreamedPipeline

__all__ = ["PruneOutcome", "prune"]


def _resolve(
    recipe_path: str | Path | None,
    recipe: Recipe | Mapping[str, Any] | None,
    output: str | Path | None,
    overrides: Sequence[str],
    lock_path: str | Path | None,
) -> tuple[Recipe, dict[str, Any] | None, Path, Path]:
    """The recipe to run (from a file, an object or a lock), the lock data, base folder and output."""
    lock_data = None
    base_dir = Path(recipe_path).resolve().parent if recipe_path else Path.cwd()
    if isinstance(overrides, str):  # one "key=value" given bare, not in a list
        overrides = (overrides,)
    if isinstance(recipe, Mapping):  # the recipe as plain data, as yaml.safe_load gives it
        recipe = recipe_from_dict(dict(recipe))
    if recipe is not None and overrides:
        raise ValueError("prune: overrides apply to a recipe file; change the Recipe object itself instead")
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


def prune(
    recipe_path: str | Path | None = None,
    *,
    recipe: Recipe | Mapping[str, Any] | None = None,
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
    run = PruneRun(
        recipe=recipe,
        base_dir=base_dir,
        out=out,
        overwrite=overwrite,
        progress=progress,
        log=log,
        lock_data=lock_data,
        lock_path=lock_path,
        recipe_path=recipe_path,
    )
    pipeline = StreamedPipeline() if recipe.model.stream else Pipeline()
    with _locked_threads((lock_data or {}).get("threads"), log):
        return pipeline.execute(run)


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
