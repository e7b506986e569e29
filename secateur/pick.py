"""`secateur prune --pick latency=0.7 SEARCH_DIR`: compile the Pareto front point a user chooses.

A Pareto search (`allocation.search.objectives`) writes front.json beside winner.yaml: every
non-dominated point with its proxy, predicted time and removal, and its allocation table. Picking
writes `picked.yaml` in the search folder, the winner recipe with the chosen point's table and
removal (a plain recipe again, compiled without Optuna), which `secateur prune` then compiles.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from secateur.runtime.store.atomic import atomic_write_text
from secateur.runtime.store.outdir import check_file_replaceable, record_files
from secateur.search.pareto import pick

SPEED_KEYS = ("flops", "latency", "throughput")


def load_front(search_dir: Path) -> list[dict[str, Any]]:
    """The points of `search_dir`/front.json, with a clear error when the folder has none."""
    path = search_dir / "front.json"
    if not path.is_file():
        raise ValueError(
            f"--pick: {path} does not exist; give the folder of a Pareto search "
            "(allocation.search.objectives: [kl, latency] or [kl, params])"
        )
    return json.loads(path.read_text())["points"]


def picked_recipe(search_dir: str | Path, query: str) -> tuple[Path, dict[str, Any]]:
    """Write `search_dir`/picked.yaml for the front point `query` chooses; returns it and the point."""
    folder = Path(search_dir)
    point = pick(load_front(folder), query)  # bad query or no such point: refused before any write
    doc = yaml.safe_load((folder / "winner.yaml").read_text())
    doc["allocation"]["table"] = point["table"]
    budget = {k: v for k, v in doc["budget"].items() if k not in SPEED_KEYS}
    budget["params"], budget["phase"] = int(point["removed_params"]), "both"
    doc["budget"] = budget
    key, _, value = query.partition("=")
    doc["name"] = f"{doc.get('name', 'search')}-pick-{key}-{value}"
    doc["output"]["dir"] = str(folder.parent / f"model-{key}-{value}")
    shown = ", ".join(
        f"{k} {point[k]:.4g}" for k in ("kl", "ppl", "latency", "removed_fraction") if k in point
    )
    header = f"# Pareto front point (trial {point['trial']}) picked by --pick {query}: {shown}\n"
    dest = folder / "picked.yaml"
    check_file_replaceable(dest, True, flag=None)
    atomic_write_text(dest, header + yaml.safe_dump(doc, sort_keys=False))
    record_files([dest])
    return dest, point
