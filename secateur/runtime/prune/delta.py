"""The pruned layer's outputs without running it again, when only its MLP channels changed.

The sequential pass needs each pruned layer's outputs on the calibration batches (the next
layer's inputs). When a layer lost MLP channels and nothing else, and the family adds the MLP's
down projection straight to the residual stream (LLaMA, Mistral, Qwen, pre-norm OPT; not
Gemma's post-feed-forward norm), those outputs are the layer's outputs from the statistics pass
(which runs anyway) minus the old down projection's output plus the restored one's on the kept
channels: y' = y - down(a) + down'(a[:, kept]). That costs one down projection of the pruned
width instead of a whole layer forward (about a third of the sequential pass on SmolLM2).

The intermediate activations `a` of every calibration token must be held for one layer, so the
shortcut is taken only while they fit in `ACTIVATION_CACHE_BYTES`; beyond that the layer simply
runs again (same result up to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.plan import LayerPlan
from secateur.runtime.prune.refine import BranchRecorder

ACTIVATION_CACHE_BYTES = 2 * 1024**3  # the most one layer's recorded MLP activations may take


def mlp_only_recorder(
    model: nn.Module, adapter: ModelAdapter, i: int, lp: LayerPlan, hidden: list[torch.Tensor]
) -> BranchRecorder | None:
    """A recorder of layer i's down projection inputs and outputs when its pruned outputs can be
    patched, else None."""
    attn_units = (lp.q_per_group, lp.kv_groups, lp.v_per_group)
    if not adapter.mlp_adds_to_residual or lp.mlp is None or lp.drop_mlp or lp.drop_attn:
        return None
    if any(x is not None for x in attn_units):
        return None
    tokens = sum(h.shape[:-1].numel() for h in hidden)
    if tokens * adapter.intermediate_size * hidden[0].element_size() > ACTIVATION_CACHE_BYTES:
        return None
    rec = BranchRecorder(model.get_submodule(f"{adapter.layer_prefix(i)}.{adapter.mlp_out}"))
    rec.record_inputs = rec.record_outputs = True
    return rec


@torch.inference_mode()
def patched_outputs(outputs: list[torch.Tensor], rec: BranchRecorder, kept: list[int]) -> list[torch.Tensor]:
    """y - down(a) + down'(a[..., kept]) per batch, with the already sliced and restored module."""
    idx = torch.as_tensor(kept, dtype=torch.long, device=outputs[0].device)
    out = []
    for y, a, d in zip(outputs, rec.inputs, rec.outputs):  # OPT runs its MLP on [tokens, hidden]
        out.append(y + (rec.module(a.index_select(-1, idx)) - d).reshape(y.shape))
    rec.inputs.clear()
    rec.outputs.clear()
    return out
