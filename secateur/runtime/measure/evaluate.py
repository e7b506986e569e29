"""Perplexity the standard way: mean next-token NLL over fixed windows, then exp.

Each window is scored on its own (no carried context), its first token has no target, and
the mean is over all scored tokens. With equal-length windows this equals the GPTQ/SparseGPT
protocol `exp(mean of per-window mean NLL)`, so numbers are comparable with papers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateur.runtime.measure.timing import model_device


def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | str = False,
) -> float:
    """Mean next-token NLL (nats) over every scored token of every window (`progress`: a bar,
    labelled with the string when one is given)."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, seqlen >= 2], got {tuple(windows.shape)}")
    dev = torch.device(device) if device is not None else model_device(model)
    starts = range(0, windows.shape[0], max(int(batch_size), 1))
    if progress:
        label = progress if isinstance(progress, str) else "perplexity"
        starts = tqdm(starts, desc=label, unit="batch")
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        with torch.inference_mode():
            for s in starts:
                ids = windows[s : s + max(int(batch_size), 1)].to(dev)
                logits = model(ids, use_cache=False).logits[:, :-1].float()
                target = ids[:, 1:]
                nll = F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
                )
                total += nll.double().cpu()
                count += target.numel()
    finally:
        model.train(was_training)
    return float(total) / count


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool | str = False,
) -> float:
    """exp of the mean next-token NLL over `windows` [n, seqlen] (see module docstring)."""
    return math.exp(window_nll(model, windows, batch_size, device, progress))
