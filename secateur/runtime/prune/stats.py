"""Input statistics of the consuming projections, accumulated in fp32.

A Gram matrix G = X^T X (and the column sums of X) is all that FASP scoring, FLAP's
fluctuation metric and least-squares restoration need, so statistics are gathered once
and reused by every scorer and by the search.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InputStats:
    """Running fp32 statistics of a linear layer's input columns."""

    gram: torch.Tensor
    col_sum: torch.Tensor
    n: int = 0
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    cross: torch.Tensor | None = None  # X_ref^T X: the dense stream's inputs against these
    ref_energy: torch.Tensor | None = None  # ||X_ref W^T||^2: the dense stream's output energy

    @classmethod
    def empty(cls, dim: int, device: torch.device) -> InputStats:
        return cls(torch.zeros(dim, dim, dtype=torch.float32, device=device), torch.zeros(dim, device=device))

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        self.gram.addmm_(x.T, x)
        self.col_sum += x.sum(0)
        self.n += x.shape[0]

    def add_pair(self, x: torch.Tensor, x_ref: torch.Tensor, weight: torch.Tensor) -> None:
        """Add the pruned stream's input x and the dense stream's input x_ref for the same tokens.

        Only the cross product X_ref^T X and the scalar ||X_ref W^T||^2 (for the error log) are kept:
        a full X_ref^T X_ref would cost another Gram-sized product per batch."""
        self.add(x)
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)
        r = x_ref.reshape(-1, x_ref.shape[-1]).to(torch.float32)
        if self.cross is None:
            self.cross = torch.zeros_like(self.gram)
            self.ref_energy = torch.zeros((), dtype=torch.float64, device=self.gram.device)
        self.cross.addmm_(r.T, x)
        self.ref_energy += (r @ weight.detach().to(torch.float32).T).square().sum().double()

    @property
    def col_norm(self) -> torch.Tensor:
        """||X[:, j]||_2 for every input column j."""
        return self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def mean(self) -> torch.Tensor:
        return self.col_sum / max(self.n, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Per-column variance of the input (FLAP's fluctuation)."""
        return (self.gram.diagonal() / max(self.n, 1) - self.mean**2).clamp_min(0)


@contextmanager
def collect_inputs(modules: dict[str, nn.Linear]) -> Iterator[dict[str, InputStats]]:
    """While active, every forward through `modules` adds its input to that module's stats."""
    stats = {name: InputStats.empty(m.in_features, m.weight.device) for name, m in modules.items()}

    def hook(name: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            stats[name].add(args[0])

        return fn

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


class PairedCollector:
    """Statistics of consumer inputs on two streams over the same tokens (error-correcting restoration).

    Run the dense stream's batch under `reference()` (its inputs are held), then the pruned
    stream's batch under `accumulate()`: each consumer adds X^T X and the cross product X_ref^T X,
    and the held inputs are dropped, so only one batch of activations is alive.
    """

    def __init__(self, modules: dict[str, nn.Linear]) -> None:
        self.stats = {name: InputStats.empty(m.in_features, m.weight.device) for name, m in modules.items()}
        self.modules = modules
        self.held: dict[str, torch.Tensor] = {}
        self.mode = "accumulate"

    def reference(self) -> None:
        self.mode = "reference"

    def accumulate(self) -> None:
        self.mode = "accumulate"

    def _hook(self, name: str):
        def fn(_mod: nn.Module, args: tuple) -> None:
            if self.mode == "reference":
                self.held[name] = args[0].detach()
            else:
                self.stats[name].add_pair(args[0], self.held.pop(name), self.modules[name].weight)

        return fn

    @contextmanager
    def active(self) -> Iterator[dict[str, InputStats]]:
        handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in self.modules.items()]
        try:
            yield self.stats
        finally:
            for h in handles:
                h.remove()
            self.held.clear()
