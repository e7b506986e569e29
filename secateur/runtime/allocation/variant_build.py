"""The variant database built layer by layer, and the stitched compile that reads it.

A variant needs its layer's dense consumer statistics (fp32 Gram matrices: intermediate^2 for
down_proj, hidden^2 for o_proj, 1.4 GB per layer at Qwen2-7B's shapes). Collecting every layer's
first (`variants.dense_layer_stats`) holds them all at once, so `build_variants` runs one dense pass
(`dense_statistics` with `on_layer`) and, while layer i is resident and still dense, scores its
units (kept: one float per unit), builds and stores each wanted variant of it the store lacks, and
drops the statistics: the peak holds one layer's. With `layer_io` the dense layers stream from disk,
so `prune_stitched` runs on a model that never fits in memory: pass one builds the variants, pass
two reads each layer again, stitches its variants in and writes it. The bytes stored are those the
all-layers path stores (same statistics, selection and restoration).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import Plan
from secateur.runtime.allocation.dense import dense_statistics
from secateur.runtime.allocation.stats_spill import StatsSpill
from secateur.runtime.allocation.variants import (
    STATS_BATCH,
    LayerStats,
    Variant,
    VariantId,
    VariantStore,
    default_variants_dir,
    layer_stats,
    make_variant,
    plan_variants,
    stitch,
    store_key,
)
from secateur.runtime.prune.sequential import LayerIO, LayerLog, PruneResult, resident_layers
from secateur.runtime.prune.stats import InputStats

Observer = Callable[[int, dict[str, InputStats]], None]


@dataclass
class Built:
    """What one building pass leaves: per-layer scores and unit counts (statistics only when asked
    to keep them), every block's angular distance, seconds spent building, variants built."""

    layers: dict[int, LayerStats] = field(default_factory=dict)
    angular: dict[int, float] = field(default_factory=dict)
    seconds: float = 0.0
    built: int = 0
    layer_seconds: dict[int, float] = field(default_factory=dict)  # building each layer's variants


class _PerLayer:
    """`dense_statistics`' `on_layer`: layer i's scores, then its missing variants, then its statistics
    are dropped (kept only with `keep_stats`, for a caller that builds other variants later)."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        store: VariantStore,
        todo: dict[int, list[tuple[str, int]]],
        scoring: tuple[str, str, float],
        keep_stats: bool,
        bar: tqdm,
        observe: Observer | None,
        spill: StatsSpill | None = None,
    ) -> None:
        self.model, self.adapter, self.store, self.todo = model, adapter, store, todo
        self.metric, self.restore, self.damping = scoring
        self.keep_stats, self.bar, self.observe, self.spill = keep_stats, bar, observe, spill
        self.out = Built()

    def __call__(self, i: int, stats: dict[str, InputStats]) -> None:
        if self.observe is not None:
            self.observe(i, stats)
        ls = layer_stats(self.model, self.adapter, i, stats, self.metric)
        if self.spill is not None:
            self.spill.put(i, stats)
        dev = next(self.model.parameters()).device
        t = time.perf_counter()
        for kind, count in self.todo.get(i, ()):
            before = self.store.built

            def build(kind: str = kind, count: int = count) -> Variant:
                return make_variant(self.model, self.adapter, i, ls, kind, count, self.restore, self.damping)

            self.store.get(i, kind, count, build, dev, remember=False)
            self.out.built += self.store.built - before
            self.bar.update(1)
        self.out.layer_seconds[i] = time.perf_counter() - t
        self.out.seconds += self.out.layer_seconds[i]
        self.out.layers[i] = ls if self.keep_stats else LayerStats({}, ls.scores, ls.n_units)


def build_variants(
    model: nn.Module,
    adapter: ModelAdapter,
    store: VariantStore,
    calib_ids: torch.Tensor,
    wanted: list[VariantId],
    layers: list[int],
    mlp: bool,
    attention: bool,
    scoring: tuple[str, str, float],
    *,
    layer_io: LayerIO | None = None,
    keep_stats: bool = False,
    progress: bool = True,
    observe: Observer | None = None,
    spill: StatsSpill | None = None,
) -> Built:
    """One dense pass over `layers` (statistics of the MLP and/or attention consumers): every layer's
    unit scores under `scoring` (metric, restore, damping), and every `wanted` variant the store
    lacks built and stored while its layer is resident (`layer_io`: the dense layers read from disk).
    `observe(i, stats)` sees each layer's statistics as they arrive (tests count the live ones);
    `spill` parks them on disk for variants built later (a search's trials)."""
    todo: dict[int, list[tuple[str, int]]] = {}
    for i, kind, count in wanted:
        if not store.has_valid(i, kind, count):
            todo.setdefault(i, []).append((kind, count))
    stray = sorted(set(todo) - set(layers))
    if stray:
        raise ValueError(f"variants wanted of layers {stray}, outside the layers measured {sorted(layers)}")
    n = sum(len(v) for v in todo.values())
    with tqdm(total=n, desc="variants", unit="variant", disable=not progress or not n) as bar:
        per = _PerLayer(model, adapter, store, todo, scoring, keep_stats, bar, observe, spill)
        dense = dense_statistics(
            model, adapter, calib_ids, layers, mlp, attention, STATS_BATCH, layer_io=layer_io, on_layer=per
        )
    per.out.angular = dense.angular
    return per.out


def check_stitchable(plan: Plan) -> None:
    """What stitched variants cannot express (one-shot score selection and plain restoration only)."""
    if plan.selection != "score" or plan.error_correction or plan.refine_steps:
        raise ValueError(
            "allocation.compile: 'stitched' uses one-shot score selection and plain restoration; "
            "importance.selection obs, restore.error_correction and restore.refine_steps need 'sequential'"
        )


def stitch_pass(
    model: nn.Module, adapter: ModelAdapter, store: VariantStore, plan: Plan, layer_io: LayerIO
) -> dict[int, LayerKeep]:
    """Every layer in turn: read (`layer_io.load`), its stored variants stitched in, written (`done`)."""
    by_layer: dict[int, list[VariantId]] = {}
    for vid in plan_variants(plan):
        by_layer.setdefault(vid[0], []).append(vid)
    dev = next(model.parameters()).device
    keep: dict[int, LayerKeep] = {}
    for i in range(adapter.num_layers):
        layer_io.load(i)
        if i in by_layer:
            variants = [store.get(*vid, lambda vid=vid: _lost(store, vid), dev) for vid in by_layer[i]]
            keep.update(stitch(model, adapter, {i: variants}))
        layer_io.done(i)
    return keep


def _lost(store: VariantStore, vid: VariantId) -> Variant:
    raise RuntimeError(
        f"variant database: {store.path(*vid)} was removed or damaged after this run built it; "
        "run the prune again (it rebuilds what is missing)"
    )


def prune_stitched(
    model: nn.Module,
    adapter: ModelAdapter,
    calib_ids: torch.Tensor,
    plan: Plan,
    store_root: str | os.PathLike[str] | None = None,
    progress: bool = True,
    layer_io: LayerIO | None = None,
) -> PruneResult:
    """Execute `plan` by stitching stored variants (one-shot from dense statistics), building the
    missing ones first, layer by layer; the result is exactly the candidate a search with the same
    store scored. `layer_io` (streaming): pass one reads the dense layers to build the variants,
    pass two reads each layer again, stitches it and writes it."""
    t0 = time.perf_counter()
    check_stitchable(plan)
    io = layer_io or resident_layers()
    key = store_key(model, calib_ids, plan.metric, plan.restore, plan.damping, io.weights_fingerprint())
    store = VariantStore(store_root or default_variants_dir(), key)
    t_key = time.perf_counter()  # the key hashes the dense weights (streamed: read from the files)
    wanted = plan_variants(plan)
    mlp = any(k == "mlp" for _, k, _ in wanted)
    attention = any(k != "mlp" for _, k, _ in wanted)
    layers = sorted({i for i, _, _ in wanted})
    scoring = (plan.metric, plan.restore, plan.damping)
    built = Built()
    missing = [v for v in wanted if not store.has_valid(*v)]  # each stored file read and checked once
    if missing:
        built = build_variants(
            model,
            adapter,
            store,
            calib_ids,
            missing,
            layers,
            mlp,
            attention,
            scoring,
            layer_io=io.dense(),
            progress=progress,
        )
    t1 = time.perf_counter()
    keep = stitch_pass(model, adapter, store, plan, io)
    logs = [LayerLog(i, 0.0, lk.to_dict()) for i, lk in keep.items()]
    phases = {
        "variants_key": t_key - t0,
        "variants": t1 - t_key,
        "stitch": time.perf_counter() - t1,
        "total": time.perf_counter() - t0,
    }
    extra = {
        "variants": {
            "folder": str(store.folder),
            "key": store.key,
            "built": store.built,
            "build_s_per_layer": {str(i): round(t, 3) for i, t in sorted(built.layer_seconds.items())},
        }
    }
    return PruneResult(keep, logs, phases, plan, extra)
