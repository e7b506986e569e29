"""Fingerprints of tensors and model weights: what locks and the variant database are keyed by."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def tensor_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda x: x[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model's weights (tied tensors counted once)."""
    seen: set[int] = set()
    items = []
    for name, p in model.state_dict().items():
        if p.data_ptr() in seen and p.numel():
            continue
        seen.add(p.data_ptr())
        items.append((name, p))
    return tensor_fingerprint(items)


def ids_fingerprint(ids: torch.Tensor) -> str:
    """Short digest of token ids (shape included), e.g. calibration windows."""
    t = ids.detach().to(torch.int64).cpu().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()[:16]
