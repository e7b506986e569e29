"""Capture what each decoder layer receives, without running the decoder layers.

Every layer is temporarily replaced by a recorder that stores its keyword arguments
(attention mask, rotary embeddings: these may differ per layer, e.g. Gemma's local and
global layers) and passes hidden states through. Only layer 0's hidden input is kept;
later layers' inputs are produced one layer at a time by the sequential pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter


class _Recorder(nn.Module):
    def __init__(self, store: list[dict[str, Any]], keep_hidden: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.store = store
        self.keep_hidden = keep_hidden

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layers are expected to take keyword arguments after hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        kwargs["use_cache"] = False
        self.store.append(kwargs)
        if self.keep_hidden is not None:
            self.keep_hidden.append(hidden_states)
        return hidden_states


@dataclass
class LayerInputs:
    """Hidden states entering the current layer (one tensor per batch) and every layer's kwargs."""

    hidden: list[torch.Tensor]
    kwargs: list[list[dict[str, Any]]]  # [layer][batch]


def base_model(model: nn.Module, adapter: ModelAdapter) -> nn.Module:
    """The decoder stack without the LM head (the head is costly and not needed here)."""
    return model.get_submodule(adapter.layers_path.rsplit(".", 1)[0].split(".")[0])


@torch.inference_mode()
def capture_inputs(
    model: nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int
) -> LayerInputs:
    """Run embeddings once per batch and record what every layer would be called with."""
    layers = adapter.layers(model)
    originals = list(layers)
    kwargs: list[list[dict[str, Any]]] = [[] for _ in originals]
    hidden: list[torch.Tensor] = []
    for i in range(len(originals)):
        layers[i] = _Recorder(kwargs[i], hidden if i == 0 else None)
    try:
        dev = next(model.parameters()).device
        for start in range(0, ids.shape[0], batch_size):
            base_model(model, adapter)(input_ids=ids[start : start + batch_size].to(dev), use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return LayerInputs(hidden, kwargs)


@torch.inference_mode()
def run_layer(
    layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]
) -> list[torch.Tensor]:
    """Run one decoder layer on every batch; returns the outputs (the next layer's inputs)."""
    outs = []
    for h, kw in zip(hidden, kwargs):
        out = layer(h, **kw)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs
