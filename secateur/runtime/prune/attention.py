"""Secateur's own attention module, for layers whose value head dim is smaller than the query's.

FASP's value-channel unit removes rows of W_V together with the matching columns of W_O, so
values have `v_head_dim < head_dim` while queries and keys stay whole (RoPE needs them).
Hugging Face attention reshapes values with the query head dim, so such layers run through
this module instead. It keeps the original child names (q_proj, k_proj, v_proj, o_proj,
q_norm, k_norm), so adapters, surgery, statistics and saving see the usual layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CHILDREN = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class VChannelAttention(nn.Module):
    """Grouped-query attention with RoPE where values may be narrower than queries and keys."""

    secateur_v_channel = True

    def __init__(self, inner: nn.Module, head_dim: int) -> None:
        super().__init__()
        for name in _CHILDREN:
            child = getattr(inner, name, None)
            if child is not None:
                setattr(self, name, child)
        if getattr(inner, "attn_logit_softcapping", None) or getattr(
            inner.config, "attn_logit_softcapping", None
        ):
            raise ValueError("v_channel pruning does not support attention logit soft-capping (Gemma 2)")
        self.layer_idx = inner.layer_idx
        self.head_dim = head_dim
        self.scaling = float(inner.scaling)
        self.config = inner.config
        self.num_key_value_groups = getattr(inner, "num_key_value_groups", 1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        b, t = hidden_states.shape[:2]
        d = self.head_dim
        q = self.q_proj(hidden_states).view(b, t, -1, d)
        k = self.k_proj(hidden_states).view(b, t, -1, d)
        n_kv = k.shape[2]
        v = self.v_proj(hidden_states).view(b, t, n_kv, -1)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = q.shape[1] // n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        mask = attention_mask
        if mask is not None:
            mask = mask[..., : k.shape[-2]]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=self.scaling
        )
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out), None
