"""Held-out states of the best candidate so far, so that a child is scored from its first changed layer.

An evolutionary child differs from its parent in a few layers; every layer below the first of them
computes exactly what it computed for the parent. `PrefixCache` keeps, for the plan of the best
candidate this process scored on every held-out window, the hidden states entering each layer for
each window, and runs a candidate from its first layer whose plan differs from that one. The logits
are bitwise those of a full forward: the same weights on the same inputs, in the same batches (the
stage bounds and the batch size fix the batches). A candidate scored on every window whose value
beats the cached plan's takes its place, with the states recorded while it ran.

Holding the states of two plans (the cached one and the one being scored) costs 2 x layers x
held-out tokens x hidden size; beyond `max_bytes` the cache stays off and every candidate runs whole.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.plan import LayerPlan, Plan
from secateur.runtime.allocation.proxy import from_layer

PREFIX_CACHE_BYTES = 4 * 1024**3


class PrefixCache:
    """States entering layers 1..L for every held-out window, for one plan (the best scored in full)."""

    def __init__(
        self, adapter: ModelAdapter, heldout: torch.Tensor, dtype: torch.dtype, max_bytes: int
    ) -> None:
        self.adapter, self.n_layers = adapter, adapter.num_layers
        n, t = heldout.shape
        need = 2 * self.n_layers * n * t * adapter.hidden_size * torch.empty((), dtype=dtype).element_size()
        self.enabled = need <= max_bytes
        self.plan: dict[int, LayerPlan] | None = None
        self.value = math.inf
        self.hidden: dict[tuple[int, int], torch.Tensor] = {}  # (layer j, window) -> states entering j
        self._new: dict[tuple[int, int], torch.Tensor] = {}
        self.layers_run = 0  # decoder layers run per window, summed (what the cache saves shows here)

    def first_changed(self, plan: Plan) -> int:
        """The first layer whose plan differs from the cached one (0 when nothing is cached)."""
        if not self.enabled or self.plan is None:
            return 0
        for j in range(self.n_layers):
            if plan.layers.get(j, LayerPlan()) != self.plan.get(j, LayerPlan()):
                return j
        return self.n_layers

    @torch.inference_mode()
    def logits(self, model: nn.Module, ids: torch.Tensor, start: int, first: int) -> torch.Tensor:
        """Logits of windows start.. (the batch `ids`), running layers first..L-1 and recording what
        they output for a later `commit`."""
        layers = self.adapter.layers(model)
        windows = range(start, start + ids.shape[0])

        def record(j: int):
            def hook(_m: nn.Module, _a: tuple, out) -> None:
                h = out[0] if isinstance(out, tuple) else out
                for b, w in enumerate(windows):
                    self._new[(j + 1, w)] = h[b]

            return hook

        handles = (
            [layers[j].register_forward_hook(record(j)) for j in range(first, self.n_layers)]
            if self.enabled
            else []
        )
        try:
            with from_layer(model, self.adapter, first) as inj:
                if first > 0:
                    inj.value = torch.stack([self.hidden[(first, w)] for w in windows])
                logits = model(input_ids=ids, use_cache=False).logits
        finally:
            for h in handles:
                h.remove()
        self.layers_run += (self.n_layers - first) * len(windows)
        return logits

    def commit(self, plan: Plan, value: float, first: int) -> None:
        """A candidate scored on every window: it becomes the cached plan when it beats the cached one."""
        new, self._new = self._new, {}
        if not self.enabled or not value < self.value:
            return
        kept = {k: v for k, v in self.hidden.items() if k[0] <= first}  # layers below `first` are shared
        self.hidden = {**kept, **new}
        self.plan, self.value = dict(plan.layers), value

    def discard(self) -> None:
        """A candidate stopped before its last stage: its recorded states are dropped."""
        self._new = {}
