"""The dense teacher's next-token distributions, computed once before pruning and kept as top-k
log-probabilities (indices, values) plus the log-mass of the rest: k+1 numbers per position
instead of a vocabulary's worth, so the teacher need not stay in memory while the student trains."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.runtime.heal.loss import rest_logmass


@dataclass
class TeacherTargets:
    """Per training sequence and position: top-k token ids, their log-probs, the rest's log-mass."""

    idx: torch.Tensor  # int32 [N, L, k]
    logp: torch.Tensor  # float32 [N, L, k]
    rest: torch.Tensor  # float32 [N, L]

    def __len__(self) -> int:
        return self.idx.shape[0]


@torch.no_grad()
def teacher_targets(
    model: nn.Module, windows: torch.Tensor, top_k: int, batch: int = 4, progress: bool = True
) -> TeacherTargets:
    """Run the dense model over every training window and keep its top-k log-probabilities."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx, logp, rest = [], [], []
    steps = range(0, windows.shape[0], batch)
    for s in tqdm(steps, desc="heal: teacher distributions", unit="batch", disable=not progress):
        logits = model(input_ids=windows[s : s + batch].to(device), use_cache=False).logits
        lp = torch.log_softmax(logits.float(), dim=-1)
        v, i = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
        idx.append(i.to(torch.int32).cpu())
        logp.append(v.cpu())
        rest.append(rest_logmass(v).cpu())
    model.train(was_training)
    return TeacherTargets(torch.cat(idx), torch.cat(logp), torch.cat(rest))
