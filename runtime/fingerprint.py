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


def saved_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors as they are saved: aliases (tied lm_head) once, on CPU, contiguous, floating
    tensors cast to `dtype`. Lock fingerprints hash exactly these."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        key = v.data_ptr()
        if key in seen and v.numel() > 0:
            continue
        seen.add(key)
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous()
    return out


def model_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """Fingerprint of a model's weights (tied tensors counted once), as saved in `dtype`: the same
    tensors an output of that dtype holds."""
    return tensor_fingerprint(list(saved_state_dict(model, dtype).items()))


def ids_fingerprint(ids: torch.Tensor) -> str:
    """Short digest of token ids (shape included), e.g. calibration windows."""
    t = ids.detach().to(torch.int64).cpu().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()[:16]
