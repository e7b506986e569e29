"""Everything a trial reuses, computed once from the dense model.

One dense calibration pass, layer by layer, gives every eligible layer's consumer Gram
matrices (o_proj / down_proj inputs), the unit scores derived from them, and each block's
angular importance (CFSP). The dense model's next-token distributions on held-out windows
(disjoint from calibration) are the reference of the KL proxy. Restored consumer weights are
memoised by (layer, kept count): selection depends only on the count once scores are fixed,
so a count tried again costs nothing.

The dense reference is stored in full (fp32 log-probabilities) when it fits in
`reference_mb` (default 1024 MiB: e.g. 4096 tokens x 49152 vocab), otherwise as the dense
top-`topk` (default 256) log-probabilities plus the remaining mass as one bucket; the KL on
that coarsened distribution is a tight lower bound of the full KL.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups
from secateur.graph.keep import LayerKeep
from secateur.runtime.data import calibration_windows, eval_windows, split_tokens
from secateur.runtime.dense import dense_statistics
from secateur.runtime.proxy import Reference, dense_reference
from secateur.runtime.score import unit_scores
from secateur.runtime.sequential import restore_layer
from secateur.runtime.stats import InputStats


@dataclass
class LayerCache:
    """Dense statistics of one eligible layer: consumer stats, unit scores and unit counts."""

    stats: dict[str, InputStats]  # consumer module name -> input statistics
    scores: dict[str, torch.Tensor]  # "mlp_channel" / "kv_group" / "q_head" -> one score per unit
    n_units: dict[str, int]


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
    """Dense statistics, scores, block importances, held-out windows and the dense reference."""

    layers: dict[int, LayerCache]
    angular: dict[int, float]  # block index -> angular distance between its input and output
    heldout: torch.Tensor  # [n, T] token ids
    reference: Reference
    metric: str = "fasp"
    memo_mb: int = 512
    _memo: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _memo_bytes: int = 0

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
        metric: str = "fasp",
        batch_size: int = 8,
        reference_mb: int = 1024,
        topk: int = 256,
        memo_mb: int = 512,
    ) -> SearchCache:
        """One dense pass over the calibration windows plus one over the held-out windows."""
        dense = dense_statistics(model, adapter, calib_ids, layers, mlp, attention, batch_size)
        out = {i: cls._layer_cache(model, adapter, i, st, metric) for i, st in dense.stats.items()}
        ref = dense_reference(model, heldout_ids, batch_size, reference_mb, topk)
        return cls(out, dense.angular, heldout_ids.cpu(), ref, metric, memo_mb)

    @staticmethod
    def _layer_cache(
        model: nn.Module, adapter: ModelAdapter, i: int, stats: dict[str, InputStats], metric: str
    ) -> LayerCache:
        p = adapter.layer_prefix(i)
        groups = {g.kind: g for g in layer_groups(model, adapter, i)}
        scores: dict[str, torch.Tensor] = {}
        mlp_name, o_name = f"{p}.{adapter.mlp_out}", f"{p}.{adapter.o}"
        if mlp_name in stats and "mlp_channel" in groups:
            scores["mlp_channel"] = unit_scores(model, groups["mlp_channel"], stats[mlp_name], metric).cpu()
        if o_name in stats and "kv_group" in groups:
            for kind in ("kv_group", "q_head"):
                scores[kind] = unit_scores(model, groups[kind], stats[o_name], metric).cpu()
        return LayerCache(dict(stats), scores, {k: g.n_units for k, g in groups.items()})

    def restored(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        i: int,
        key: tuple,
        part: LayerKeep,
        damping: float,
        method: str,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Restored consumer weights of layer i for the keep `part` (computed on the dense weights
        the model holds right now), memoised under `key` within `memo_mb`."""
        full_key = (i, key, damping, method)
        hit = self._memo.get(full_key)
        if hit is not None:
            self._memo.move_to_end(full_key)
            return hit
        weights, _ = restore_layer(
            model, adapter, i, part, self.layers[i].stats, damping, method, errors=False
        )
        size = sum(_nbytes(w) for w in weights.values())
        if size <= self.memo_mb * 2**20:
            self._memo[full_key] = weights
            self._memo_bytes += size
            while self._memo_bytes > self.memo_mb * 2**20:
                _, old = self._memo.popitem(last=False)
                self._memo_bytes -= sum(_nbytes(w) for w in old.values())
        return weights


def _nbytes(pair: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in pair if t is not None)
