"""Fingerprints of tensors and model weights: what locks and the variant database are keyed by.

Each tensor is hashed on its own (name, shape, dtype, raw bytes) and the fingerprint is the hash
of those digests in name order, so the streaming runtime, which sees a model's tensors layer by
layer, gives the same fingerprint as a pass over a whole model in memory.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


class Fingerprint:
    """Accumulates per-tensor digests; `hexdigest` combines them in name order."""

    def __init__(self) -> None:
        self._digests: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._digests:
            raise ValueError(f"fingerprint: tensor {name!r} added twice")
        t = t.detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():  # hashed through a view of the tensor's memory, not a bytes copy of it
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._digests[name] = h.hexdigest()

    def copy(self) -> Fingerprint:
        """A fingerprint holding the same digests so far (each copy then grows on its own)."""
        out = Fingerprint()
        out._digests = dict(self._digests)
        return out

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._digests):
            h.update(f"{name}={self._digests[name]};".encode())
        return h.hexdigest()


def tensor_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over every tensor's name, shape, dtype and raw bytes (order-free: see Fingerprint)."""
    fp = Fingerprint()
    for name, t in tensors:
        fp.add(name, t)
    return fp.hexdigest()


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
        out[k] = saved_tensor(v, dtype)
    return out


def saved_tensor(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One tensor as saved: on CPU, contiguous, cast to `dtype` when floating."""
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def model_fingerprint(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """Fingerprint of a model's weights (tied tensors counted once), as saved in `dtype`: the same
    tensors an output of that dtype holds."""
    return tensor_fingerprint(list(saved_state_dict(model, dtype).items()))


def model_fingerprint_v1(model: nn.Module, dtype: torch.dtype | None = None) -> str:
    """The fingerprint lock_version 1 recorded: one sha256 over every tensor's name, shape, dtype
    and bytes in name order (not combinable layer by layer, hence version 2). Kept so that every
    lock ever written still verifies."""
    h = hashlib.sha256()
    for name, t in sorted(saved_state_dict(model, dtype).items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.numel():  # hashed through a view of the tensor's memory, not a bytes copy of it
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids (shape included), e.g. the text a heal trained on (locks record it)."""
    t = ids.detach().to(torch.int64).cpu().contiguous()
    return hashlib.sha256(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def ids_fingerprint(ids: torch.Tensor) -> str:
    """Short digest of token ids (shape included), e.g. calibration windows."""
    return ids_digest(ids)[:16]
