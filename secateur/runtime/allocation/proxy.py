"""The quality proxy against a dense reference: KL(dense || pruned) or perplexity on held-out tokens.

BlockPruner, SPRINT, Bonsai and the allocation search all score candidates with these
functions, so a candidate is judged the same way everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.runtime.prune.capture import LayerInputs, capture_inputs, run_layer

ProxyKind = Literal["kl", "ppl"]


@dataclass
class Reference:
    """The dense model's next-token log-probabilities on the held-out windows.

    Full: `logp` [n, T-1, V]. Top-k: `logp` [n, T-1, k] at `index`, plus `log_rest`, the log of
    the probability mass outside the top k.
    """

    logp: torch.Tensor
    index: torch.Tensor | None = None
    log_rest: torch.Tensor | None = None

    @property
    def full(self) -> bool:
        return self.index is None

    def nbytes(self) -> int:
        ts = [t for t in (self.logp, self.index, self.log_rest) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)


@torch.inference_mode()
def dense_reference(
    model: nn.Module, windows: torch.Tensor, batch_size: int, reference_mb: int, topk: int
) -> Reference:
    """Next-token log-probabilities of the (dense) model on `windows`, full or top-k."""
    dev = next(model.parameters()).device
    n, t = windows.shape
    vocab = int(model.get_output_embeddings().weight.shape[0])
    full = n * (t - 1) * vocab * 4 <= reference_mb * 2**20
    k = min(topk, vocab)
    parts: list[tuple[torch.Tensor, ...]] = []
    for s in range(0, n, batch_size):
        logits = model(windows[s : s + batch_size].to(dev), use_cache=False).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        if full:
            parts.append((logp.cpu(),))
        else:
            top, idx = logp.topk(k, dim=-1)
            rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-7))
            parts.append((top.cpu(), idx.to(torch.int32).cpu(), rest.cpu()))
    if full:
        return Reference(torch.cat([p[0] for p in parts]))
    return Reference(*(torch.cat([p[j] for p in parts]) for j in range(3)))


def batch_terms(
    logits: torch.Tensor, ids: torch.Tensor, ref: Reference, rows: slice, kind: ProxyKind
) -> float:
    """Sum over the batch's scored tokens of KL(dense || pruned) or of the NLL."""
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    if kind == "ppl":
        return float(F.nll_loss(logq.reshape(-1, logq.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
    logp = ref.logp[rows].to(logq.device)
    if ref.full:
        return float((logp.exp() * (logp - logq)).sum())
    idx = ref.index[rows].to(logq.device).long()
    q_top = logq.gather(-1, idx)
    head = (logp.exp() * (logp - q_top)).sum()
    rest_p = ref.log_rest[rows].to(logq.device)
    rest_q = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-7))
    return float(head + (rest_p.exp() * (rest_p - rest_q)).sum())


def proxy_value(total: float, count: int, kind: ProxyKind) -> float:
    """Mean KL per token, or perplexity, from a sum of per-token terms; inf when not finite."""
    v = total / max(count, 1)
    v = math.exp(min(v, 700.0)) if kind == "ppl" else v
    return v if math.isfinite(v) else float("inf")


@torch.inference_mode()
def mean_loss(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor | None) -> float:
    """Mean next-token NLL on `ids`, or the mean KL from full `reference` log-probabilities when given
    (Bonsai's form: a mean of per-token terms rather than `batch_terms`' sum)."""
    logq = torch.log_softmax(model(ids, use_cache=False).logits[:, :-1].float(), dim=-1)
    if reference is None:
        return float(F.nll_loss(logq.reshape(-1, logq.shape[-1]), ids[:, 1:].reshape(-1)))
    return float((reference.exp() * (reference - logq)).sum(-1).mean())


class _Inject(nn.Module):
    """Stands in for layers below the one being scored: returns the cached hidden states."""

    def __init__(self) -> None:
        super().__init__()
        self.value: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.value if self.value is not None else hidden_states


@contextmanager
def from_layer(model: nn.Module, adapter: ModelAdapter, start: int) -> Iterator[_Inject]:
    """Inside the block the model's forward starts at layer `start`: every layer below it stands in
    by one injector whose `value` (set per batch) is taken as the states entering layer `start`."""
    layers = adapter.layers(model)
    originals = [layers[j] for j in range(start)]
    inj = _Inject()
    try:
        for j in range(start):
            layers[j] = inj
        yield inj
    finally:
        for j, layer in enumerate(originals):
            layers[j] = layer


class HeldoutScorer:
    """KL to a reference (or perplexity) of the current model on held-out windows, from layer i on.

    `hidden[j]` holds the states entering layer j (j = L: leaving the last layer) for the current
    model; `value(i)` runs layers i..L-1 plus the model's own final norm / head on them.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        ids: torch.Tensor,
        reference: Reference | None,
        kind: str,
        batch_size: int = 4,
    ) -> None:
        self.model, self.adapter, self.ids = model, adapter, ids
        self.reference, self.kind, self.batch_size = reference, kind, batch_size
        self.inputs: LayerInputs = capture_inputs(model, adapter, ids, batch_size)
        self.n_layers = len(adapter.layers(model))
        self.hidden: list[list[torch.Tensor]] = [self.inputs.hidden] + [[] for _ in range(self.n_layers)]
        self.refresh(0)

    def refresh(self, start: int) -> None:
        """Recompute the cached inputs of layers start+1..L after layer `start` (or later) changed."""
        layers = self.adapter.layers(self.model)
        for j in range(start, self.n_layers):
            self.hidden[j + 1] = run_layer(layers[j], self.hidden[j], self.inputs.kwargs[j])

    @torch.inference_mode()
    def value(self, start: int) -> float:
        """Mean KL per token (or perplexity) running only layers start..L-1 on the cached inputs."""
        dev = next(self.model.parameters()).device
        total, count = 0.0, 0
        with from_layer(self.model, self.adapter, start) as inj:
            for b, s in enumerate(range(0, self.ids.shape[0], self.batch_size)):
                e = min(s + self.batch_size, self.ids.shape[0])
                ids = self.ids[s:e].to(dev)
                inj.value = self.hidden[start][b] if start > 0 else None
                logits = self.model(input_ids=ids, use_cache=False).logits
                total += batch_terms(logits, ids, self.reference, slice(s, e), self.kind)  # type: ignore[arg-type]
                count += ids.shape[0] * (ids.shape[1] - 1)
        return proxy_value(total, count, self.kind)  # type: ignore[arg-type]
