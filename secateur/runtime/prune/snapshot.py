"""Exact, copy-free undo of surgery on some layers.

Surgery only ever replaces parameters and modules (it slices into new tensors), so saving each
module's dictionaries and putting them back returns the very same tensors.
"""

from __future__ import annotations

from torch import nn


class ModuleSnapshot:
    """The module dictionaries of some layers, to put back after a trial (no tensor copies)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.saved = [
            (m, dict(m.__dict__), dict(m._parameters), dict(m._modules), dict(m._buffers))
            for layer in layers
            for m in layer.modules()
        ]

    def restore(self) -> None:
        for m, d, params, mods, bufs in self.saved:
            m.__dict__.clear()
            m.__dict__.update(d)
            m.__dict__["_parameters"] = dict(params)
            m.__dict__["_modules"] = dict(mods)
            m.__dict__["_buffers"] = dict(bufs)
