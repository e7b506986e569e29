"""Counting: parameters, weight bytes and analytic FLOPs per token of a (possibly pruned) model.

Budgets, reports and the FLOPs compiler all count through here, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_shapes


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop aliases (tied embeddings): same storage, offset, shape and dtype count once."""
    seen: set[tuple] = set()
    out: list[torch.Tensor] = []
    for t in tensors:
        key = (id(t),) if t.is_meta or t.numel() == 0 else (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def total_params(model: nn.Module) -> int:
    """Parameters of the whole model, each tensor counted once (tied embeddings once)."""
    return sum(p.numel() for p in _unique(model.parameters()))


def weights_bytes(model: nn.Module) -> int:
    """Bytes held by the model's unique parameters and buffers."""
    tensors = _unique(list(model.parameters()) + list(model.buffers()))
    return sum(t.numel() * t.element_size() for t in tensors)


def _decoder_linears(model: nn.Module, adapter: ModelAdapter) -> list[nn.Linear]:
    return [m for m in adapter.layers(model).modules() if isinstance(m, nn.Linear)]


def linear_params(module: nn.Module) -> int:
    """Weights and biases of every nn.Linear inside `module` (the parameters pruning shrinks)."""
    return sum(
        p.numel() for m in module.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)
    )


def decoder_linear_params(model: nn.Module, adapter: ModelAdapter, layers: list[int] | None = None) -> int:
    """Linear weights and biases inside the decoder layers (all, or only `layers`): the budget's unit."""
    blocks = adapter.layers(model)
    if layers is None:
        return linear_params(blocks)
    return sum(linear_params(blocks[i]) for i in layers)


def attention_span(config: object, i: int, context: int) -> int:
    """Keys one token attends to in layer i: sliding-window layers see at most the window."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = i < len(layer_types) and layer_types[i] == "sliding_attention"
    else:
        sliding = bool(getattr(config, "use_sliding_window", True))
    return min(context, int(window)) if sliding and window else context


def attention_products(num_heads: int, head_dim: int, v_head_dim: int, span: int) -> int:
    """FLOPs of one token's QK^T and AV products over `span` keys (shared by the counter and the
    FLOPs budget compiler so the two cannot drift apart)."""
    return 2 * num_heads * (head_dim + v_head_dim) * span


def flops_per_token(model: nn.Module, adapter: ModelAdapter, context: int = 512) -> int:
    """FLOPs of one token attending to `context` positions: 2 x linear MACs (decoder + lm_head)
    plus QK^T and AV products; removed sublayers cost nothing. Norms, activations and the
    embedding lookup are left out (they are a rounding error next to the matmuls)."""
    linears = _decoder_linears(model, adapter)
    head = model.get_submodule(adapter.lm_head_path)
    if isinstance(head, nn.Linear):
        linears.append(head)
    macs = sum(m.in_features * m.out_features for m in linears)
    attn = 0
    for i in range(adapter.num_layers):
        s = layer_shapes(model, adapter, i)
        if s["skip_attention"]:
            continue
        span = attention_span(model.config, i, context)
        attn += attention_products(int(s["num_heads"]), int(s["head_dim"]), int(s["v_head_dim"]), span)
    return 2 * macs + attn


def served_flops(model: nn.Module, adapter: ModelAdapter, prefill: int, decode: int) -> tuple[float, float]:
    """FLOPs per token as a server spends them: a prefill computes the LM head for its last position
    only and attends to prefill/2 positions on average; a decode step computes the head every token."""
    head = model.get_submodule(adapter.lm_head_path)
    head_flops = 2 * head.weight.numel() if isinstance(head, nn.Linear) else 0
    pre = flops_per_token(model, adapter, max(prefill // 2, 1)) - head_flops + head_flops / prefill
    dec = flops_per_token(model, adapter, prefill + decode // 2)
    return pre, dec
