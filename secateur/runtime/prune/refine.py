"""Sub-block reconstruction: a few optimizer steps on a pruned MLP branch toward the dense branch.

The closed-form restoration only re-fits the consumer (down_proj) with the kept channels fixed.
Here the kept weights of the whole branch (gate/up rows and down columns; OPT's fc1/fc2) move
together to match the dense branch's output on calibration tokens: the dense model's MLP output
on the dense stream with error correction, else the dense MLP's output on the pruned stream.
The last batches are held out (never stepped on) and the best weights by held-out error are
kept, so the refinement stops as soon as it stops generalising; whole-model fine-tuning it is not.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class BranchRecorder:
    """Records a module's inputs or outputs batch by batch while a flag says so."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self.record_inputs = False
        self.record_outputs = False

    def _hook(self, _mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.record_inputs:
            self.inputs.append(args[0].detach())
        if self.record_outputs:
            self.outputs.append((out[0] if isinstance(out, tuple) else out).detach())

    @contextmanager
    def active(self) -> Iterator[BranchRecorder]:
        handle = self.module.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


def _relative_error(module: nn.Module, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    num = den = 0.0
    with torch.no_grad():
        for x, y in zip(xs, ys):
            out = module(x)
            num += float((out.float() - y.float()).square().sum())
            den += float(y.float().square().sum())
    return num / max(den, 1e-30)


def refine_branch(
    module: nn.Module,
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    steps: int,
    lr: float = 1e-4,
    holdout: float = 0.1,
) -> dict[str, float]:
    """Adam steps on `module`'s weights so module(inputs) matches targets; keeps the best held-out state.

    Returns the relative errors before and after on the held-out batches and the steps taken.
    """
    n_hold = max(1, int(round(holdout * len(inputs)))) if len(inputs) > 1 else 0
    train_x, train_y = inputs[: len(inputs) - n_hold], targets[: len(targets) - n_hold]
    hold_x, hold_y = (inputs[-n_hold:], targets[-n_hold:]) if n_hold else (inputs, targets)
    params = [p for p in module.parameters()]
    saved = [p.requires_grad for p in params]
    before = best = _relative_error(module, hold_x, hold_y)
    best_state = [p.detach().clone() for p in params]
    best_step = 0
    try:
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        with torch.enable_grad(), torch.inference_mode(False):
            for step in range(1, steps + 1):
                j = (step - 1) % max(len(train_x), 1)
                x, y = train_x[j].clone(), train_y[j].clone()
                loss = (module(x).float() - y.float()).square().mean() / y.float().square().mean().clamp_min(
                    1e-30
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step % max(len(train_x), 1) == 0 or step == steps:
                    err = _relative_error(module, hold_x, hold_y)
                    if err < best:
                        best, best_step = err, step
                        best_state = [p.detach().clone() for p in params]
                    elif step - best_step >= 2 * max(len(train_x), 1):
                        break  # two passes without a held-out improvement
    finally:
        with torch.no_grad():
            for p, s, req in zip(params, best_state, saved):
                p.copy_(s)
                p.requires_grad_(req)
    return {"heldout_before": before, "heldout_after": best, "steps": best_step}
