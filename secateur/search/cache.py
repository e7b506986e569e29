"""Everything a trial reuses, computed once from the dense model.

One dense calibration pass, layer by layer, gives every eligible layer's consumer Gram
matrices (o_proj / down_proj inputs), from which the unit scores are kept and the level variants
built while the layer is resident (the Gram matrices then go to disk, not memory), and each
block's angular importance (CFSP). The dense model's next-token distributions on held-out windows
(disjoint from calibration) are the reference of the KL proxy. Pruned and restored
structures are variants (`runtime.allocation.variants`): built once per (layer, structure, kept count),
stored on disk and stitched into the dense model for every candidate that uses them.

The dense reference is stored in full (fp32 log-probabilities) when it fits in
`reference_mb` (default 1024 MiB: e.g. 4096 tokens x 49152 vocab), otherwise as the dense
top-`topk` (default 256) log-probabilities plus the remaining mass as one bucket; the KL on
that coarsened distribution is a tight lower bound of the full KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.plan import Scoring
from secateur.runtime.allocation.proxy import Reference, dense_reference
from secateur.runtime.allocation.stats_spill import StatsSpill
from secateur.runtime.allocation.variant_build import build_variants
from secateur.runtime.allocation.variants import (
    LayerStats,
    VariantId,
    VariantSource,
    VariantStore,
    default_variants_dir,
    store_key,
)
from secateur.runtime.store.data import calibration_windows, eval_windows, split_tokens

LayerCache = LayerStats  # the name earlier code used


def search_windows(
    tokens: torch.Tensor,
    n_samples: int,
    seqlen: int,
    heldout_tokens: int,
    heldout_seqlen: int = 256,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration windows from the head of a token stream and held-out windows from its tail,
    so the proxy never scores tokens the statistics were computed on."""
    n = tokens.numel()
    tail = min(max(heldout_tokens, heldout_seqlen), n // 2)
    head, rest = split_tokens(tokens, 1.0 - tail / n)
    calib = calibration_windows(head, n_samples, min(seqlen, head.numel() - 1), seed)
    heldout = eval_windows(rest, heldout_seqlen, max(1, heldout_tokens // heldout_seqlen))
    return calib, heldout


@dataclass
class SearchCache:
    """Dense statistics, scores, block importances, held-out windows, the dense reference, and the
    variant database every candidate is stitched from."""

    layers: dict[int, LayerStats]
    angular: dict[int, float]  # block index -> angular distance between its input and output
    heldout: torch.Tensor  # [n, T] token ids
    reference: Reference
    source: VariantSource
    metric: str = Scoring.metric
    restore: str = Scoring.restore
    damping: float = Scoring.damping
    build_seconds: float = 0.0  # time this process spent building the variant database in its pass

    @classmethod
    def build(
        cls,
        model: nn.Module,
        adapter: ModelAdapter,
        calib_ids: torch.Tensor,
        heldout_ids: torch.Tensor,
        layers: list[int],
        mlp: bool = True,
        attention: bool = True,
        metric: str = Scoring.metric,
        batch_size: int = 8,
        reference_mb: int = 1024,
        topk: int = 256,
        memo_mb: int = 512,
        restore: str = Scoring.restore,
        damping: float = Scoring.damping,
        variants_dir: str | None = None,
        weights_fp: str | None = None,
        wanted: list[VariantId] | None = None,
        progress: bool = False,
    ) -> SearchCache:
        """One dense pass over the calibration windows, which also builds every `wanted` variant the
        database lacks while its layer is resident, plus one over the held-out windows; the variant
        database lives under `variants_dir` (default `default_variants_dir()`). Only the unit scores
        stay in memory: each layer's statistics are parked on disk (`StatsSpill`, beside the
        database) for the variants trials ask for later."""
        key = store_key(model, calib_ids, metric, restore, damping, weights_fp)
        store = VariantStore(variants_dir or default_variants_dir(), key, memo_mb)
        spill = StatsSpill(store.folder.parent)
        scoring = (metric, restore, damping)
        built = build_variants(
            model,
            adapter,
            store,
            calib_ids,
            list(wanted or []),
            layers,
            mlp,
            attention,
            scoring,
            progress=progress,
            spill=spill,
        )
        ref = dense_reference(model, heldout_ids, batch_size, reference_mb, topk)
        source = VariantSource(model, adapter, store, built.layers, spill, restore, damping)
        return cls(
            built.layers,
            built.angular,
            heldout_ids.cpu(),
            ref,
            source,
            metric,
            restore,
            damping,
            built.seconds,
        )
