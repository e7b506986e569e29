"""Dense layer statistics parked on disk while a search runs, read back one layer at a time.

A search builds most variants in its one dense pass (`variant_build.build_variants`), but a trial
may still ask for one the pass did not build (the budget projection's single rounding steps, the
uniform and CFSP seeds, a variant file damaged since): building it needs that layer's dense
statistics. Holding every layer's fp32 Gram matrices for the whole search costs layers x
(intermediate^2 + hidden^2) x 4 bytes of memory (0.3 GiB for SmolLM2, 42 GiB at Qwen2-7B's shapes),
so each layer's are written here as the pass measures them and read back, exactly (fp32 stored as
fp32), only for the layer a missing variant belongs to. The folder is a marked temporary one beside
the variant database (not the system's temp folder, which may be memory), removed when the spill is
closed or collected, or, after a killed run, by the next run's sweep (`runtime.store.leftovers`).
"""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from secateur.runtime.prune.stats import InputStats
from secateur.runtime.store.leftovers import new_partial_dir, release_partial_dir


def _remove(folder: Path, entry: Path | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    release_partial_dir(folder, entry)


class StatsSpill:
    """Per-layer consumer statistics in `parent/.secateur-stats-*/layer<i>.safetensors`."""

    def __init__(self, parent: str | Path) -> None:
        self.folder, entry = new_partial_dir(Path(parent), ".secateur-stats-", "search layer statistics")
        self._finalizer = weakref.finalize(self, _remove, self.folder, entry)
        self.layers: set[int] = set()

    def path(self, i: int) -> Path:
        return self.folder / f"layer{i:03d}.safetensors"

    def put(self, i: int, stats: dict[str, InputStats]) -> None:
        """Write layer i's statistics (dense-pass ones: Gram matrix, column sums, count, extras)."""
        tensors, meta = {}, {}
        for name, st in stats.items():
            if st.cross is not None or st.ref_energy is not None:
                raise ValueError(f"{name}: statistics with a dense stream beside them are not spilled")
            tensors[f"{name}|gram"] = st.gram.detach().cpu().contiguous()
            tensors[f"{name}|col_sum"] = st.col_sum.detach().cpu().contiguous()
            for k, t in st.extra.items():
                tensors[f"{name}|extra|{k}"] = t.detach().cpu().contiguous()
            meta[name] = str(st.n)
        save_file(tensors, str(self.path(i)), metadata=meta)
        self.layers.add(i)

    def get(self, i: int, device: torch.device | str = "cpu") -> dict[str, InputStats]:
        """Layer i's statistics as they were put, on `device`."""
        if i not in self.layers:
            raise KeyError(f"layer {i}: no statistics were measured for it")
        with safe_open(str(self.path(i)), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(self.path(i)), device=str(device))
        out: dict[str, InputStats] = {}
        for name, n in meta.items():
            extra = {k.split("|", 2)[2]: t for k, t in tensors.items() if k.startswith(f"{name}|extra|")}
            out[name] = InputStats(tensors[f"{name}|gram"], tensors[f"{name}|col_sum"], int(n), extra)
        return out

    def close(self) -> None:
        """Remove the folder now (also done when the spill is collected or the process exits)."""
        self._finalizer()
