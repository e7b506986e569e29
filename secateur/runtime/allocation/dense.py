"""One dense calibration pass over every layer: consumer statistics and block importance.

Allocations that compare layers (global ranking, CFSP's angular importance) and the search
need all layers' statistics before any pruning, so this pass runs the *dense* model layer
by layer (one layer's activations alive at a time) and keeps only fp32 Gram matrices, or, with
`on_layer`, only what the caller reduces each layer's statistics to while that layer is resident.
When the layers stream from disk (`layer_io`), this is the first of two streamed passes: it reads
each dense layer, measures it and drops it; the sequential pass then prunes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_shapes
from secateur.runtime.prune.capture import capture_inputs, run_layer
from secateur.runtime.prune.sequential import LayerIO
from secateur.runtime.prune.stats import InputStats, collect_inputs


@dataclass
class DenseStats:
    """Per-layer consumer statistics (eligible layers) and every block's angular distance."""

    stats: dict[int, dict[str, InputStats]]
    angular: dict[int, float]


def angular_distance(h_in: list[torch.Tensor], h_out: list[torch.Tensor]) -> float:
    """Mean over tokens of arccos(cos(h_in, h_out)) / pi: how much a block changes the stream."""
    total, count = 0.0, 0
    for a, b in zip(h_in, h_out):
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1).clamp(-1.0, 1.0)
        total += float(torch.arccos(cos).sum()) / math.pi
        count += cos.numel()
    return total / max(count, 1)


@torch.inference_mode()
def dense_statistics(
    model: nn.Module,
    adapter: ModelAdapter,
    ids: torch.Tensor,
    layers: list[int],
    mlp: bool = True,
    attention: bool = True,
    batch_size: int = 8,
    layer_io: LayerIO | None = None,
    on_layer: Callable[[int, dict[str, InputStats]], None] | None = None,
) -> DenseStats:
    """Gram matrices of o_proj / down_proj inputs for `layers`, angular distance for all blocks.

    `layer_io` reads layer i before its turn and drops it after (streaming); `on_layer(i, stats)`
    receives each eligible layer's statistics while its weights are resident, and then the
    statistics are not kept (so a whole-model allocation holds one layer's Gram matrices at a time).
    """
    inputs = capture_inputs(model, adapter, ids, batch_size)
    hidden = inputs.hidden
    blocks = adapter.layers(model)
    eligible = set(layers)
    stats: dict[int, dict[str, InputStats]] = {}
    angular: dict[int, float] = {}
    for i in range(len(blocks)):
        if layer_io is not None:
            layer_io.load(i)
        p = adapter.layer_prefix(i)
        consumers: dict[str, nn.Module] = {}
        sh = layer_shapes(model, adapter, i)  # earlier stages may have removed whole branches
        if i in eligible and mlp and not sh["skip_mlp"]:
            consumers[f"{p}.{adapter.mlp_out}"] = model.get_submodule(f"{p}.{adapter.mlp_out}")
        if i in eligible and attention and not sh["skip_attention"]:
            consumers[f"{p}.{adapter.o}"] = model.get_submodule(f"{p}.{adapter.o}")
        with collect_inputs(consumers) as st:
            nxt = run_layer(blocks[i], hidden, inputs.kwargs[i])
        angular[i] = angular_distance(hidden, nxt)
        hidden = nxt
        if i in eligible and on_layer is not None:
            on_layer(i, dict(st))
        elif i in eligible:
            stats[i] = dict(st)
        del st
        if layer_io is not None:
            layer_io.done(i)
    return DenseStats(stats, angular)
