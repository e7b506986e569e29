"""Weight fingerprints that can be computed one tensor at a time, in any order.

Each tensor is hashed on its own (name, shape, dtype, raw bytes) and the fingerprint is the hash
of those digests in name order, so the streaming runtime, which sees a model's tensors layer by
layer, gives the same fingerprint as a pass over a whole model in memory.
"""

from __future__ import annotations

import hashlib

import torch


class Fingerprint:
    """Accumulates per-tensor digests; `hexdigest` combines them in name order."""

    def __init__(self) -> None:
        self._digests: dict[str, str] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._digests:
            raise ValueError(f"fingerprint: tensor {name!r} added twice")
        t = t.detach().to("cpu").contiguous()
        h = hashlib.sha256(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        self._digests[name] = h.hexdigest()

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._digests):
            h.update(f"{name}={self._digests[name]};".encode())
        return h.hexdigest()
