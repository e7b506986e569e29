"""The distillation loss: KL(teacher || student) over the teacher's top-k tokens plus one bucket
for the rest of the vocabulary. With the teacher's k log-probabilities and the log-mass of the
rest cached, this is the exact KL between the two distributions coarsened to k+1 outcomes, so a
cached teacher costs k numbers per position instead of the whole vocabulary."""

from __future__ import annotations

import torch

MIN_MASS = 1e-6  # floor on the rest bucket's probability (log of 0 otherwise when top-k holds it all)


def rest_logmass(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(topk_logp))): the log-probability of every token outside the top k."""
    mass = topk_logp.exp().sum(-1)
    return torch.log1p(-mass.clamp(max=1 - MIN_MASS))


def topk_kl(
    logits: torch.Tensor, idx: torch.Tensor, t_logp: torch.Tensor, t_rest: torch.Tensor
) -> torch.Tensor:
    """Mean KL per position. logits: student [B, L, V]; idx/t_logp: teacher top-k [B, L, k];
    t_rest: teacher log-mass of the rest [B, L]. Computed in float32 whatever the autocast."""
    s_logp_all = torch.log_softmax(logits.float(), dim=-1)
    s_logp = s_logp_all.gather(-1, idx.long())
    s_rest = rest_logmass(s_logp)
    t_logp = t_logp.float()
    t_rest = t_rest.float()
    kl_top = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    kl_rest = t_rest.exp() * (t_rest - s_rest)
    return (kl_top + kl_rest).mean()
