"""SPRINT's least-squares restoration: after a removal, the following sublayers' consumers are
refitted against the dense model run in lockstep (see `Restorer`)."""

from __future__ import annotations

import copy
import statistics
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import has_submodule, is_skipped
from secateur.runtime.prune.branches import Candidate, branch_params
from secateur.runtime.prune.capture import capture_inputs, run_layer
from secateur.runtime.prune.restore import solve_damped


@dataclass
class FitStats:
    """Running sums for min ||X_p W'^T - Y||^2 over W' (tokens as rows): X_p^T X_p, Y^T X_p, ||Y||^2."""

    gram: torch.Tensor
    cross: torch.Tensor
    yy: float = 0.0

    @classmethod
    def empty(cls, lin: nn.Linear) -> FitStats:
        dev = lin.weight.device
        z = torch.zeros
        return cls(
            z(lin.in_features, lin.in_features, device=dev), z(lin.out_features, lin.in_features, device=dev)
        )

    def add(self, xp: torch.Tensor, y: torch.Tensor) -> None:
        xp = xp.reshape(-1, xp.shape[-1]).float()
        y = y.reshape(-1, y.shape[-1]).float()
        self.gram.addmm_(xp.T, xp)
        self.cross.addmm_(y.T, xp)
        self.yy += float(y.pow(2).sum())


def refit(w_pruned: torch.Tensor, st: FitStats, damping: float) -> tuple[torch.Tensor | None, float, float]:
    """W' = Y^T X_p (X_p^T X_p + lambda I)^-1, lambda = damping * mean diag, and the relative errors
    ||X_p W^T - Y||^2 / ||Y||^2 before (current W) and after; W' is None when it fails or does not help."""
    dt = torch.float64 if w_pruned.device.type == "cpu" else torch.float32
    w, g, b = w_pruned.detach().to(dt), st.gram.to(dt), st.cross.to(dt)
    den = max(st.yy, 1e-30)

    def err(x: torch.Tensor) -> float:
        return float((((x @ g) * x).sum() - 2 * (b * x).sum() + st.yy) / den)

    before = err(w)
    try:
        w_new = solve_damped(g, b, damping)
    except FloatingPointError as e:
        warnings.warn(f"SPRINT restoration skipped: {e}", stacklevel=2)
        return None, before, before
    if not torch.isfinite(w_new).all():
        warnings.warn("SPRINT restoration produced non-finite weights; kept the current ones", stacklevel=2)
        return None, before, before
    after = err(w_new)
    if after >= before:  # heavy damping on few tokens can fit worse than the current weight
        return None, before, before
    return w_new.to(w_pruned.dtype), before, after


class Restorer:
    """Refits o_proj / down_proj of every sublayer after a removal against the dense model.

    The dense model is a deep copy of the decoder layers made when the stage starts; both run in
    lockstep on a subset of the calibration windows, one layer at a time, and each consumer W of
    the pruned model gets W' = Y^T X_p (X_p^T X_p + lambda I)^-1 from its inputs X_p. The target Y
    is the dense consumer's output X_d W_d^T (target "output", the textbook form
    W' = W_d X_d^T X_p (X_p^T X_p + lambda I)^-1), or with target "residual" (default) that output
    plus the gap between the dense and pruned residual streams the consumer adds into, so the
    first consumer after a removal absorbs the missing branch and later ones keep the streams
    aligned. "residual" applies to layers that add branch outputs straight to the stream (LLaMA,
    Qwen, Mistral, pre-LN OPT: checked numerically per layer); sandwich-norm layers (Gemma) use
    "output".

    Neither is guaranteed to lower the held-out proxy, so the greedy loop keeps a refit only when
    it does (`revert` puts the previous weights back). On SmolLM2-135M (16 x 512 calibration
    tokens, KL on 16 x 256 held-out tokens): removing layer 15's MLP gives KL 0.112, refitted
    0.088 with the residual target and 0.200 with the output target; removing layer 10's
    attention gives 0.088, refitted 0.146 (residual) and 0.328 (output): matching the dense
    consumers' outputs undoes the later layers' own compensation of a removed branch.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        windows: torch.Tensor,
        damping: float,
        batch_size: int,
        target: str = "residual",
    ) -> None:
        if target not in ("residual", "output"):
            raise ValueError(f"restoration target must be 'residual' or 'output', got {target!r}")
        self.model, self.adapter, self.damping, self.target = model, adapter, damping, target
        self.dense = copy.deepcopy(adapter.layers(model))
        self.inputs = capture_inputs(model, adapter, windows, batch_size)
        self.windows = int(windows.shape[0])
        self.undo: list[tuple[nn.Linear, nn.Parameter]] = []

    def _consumers(self, layer: nn.Module) -> list[str]:
        """o_proj then down_proj (the order they run in), for the branches `layer` still has."""
        out = []
        if not is_skipped(layer.get_submodule(self.adapter.attn)):
            out.append(self.adapter.o)
        lin = (
            layer.get_submodule(self.adapter.mlp_out) if has_submodule(layer, self.adapter.mlp_out) else None
        )
        if lin is not None and lin.in_features > 0:
            out.append(self.adapter.mlp_out)
        return out

    @torch.inference_mode()
    def _dense_layer(
        self, j: int, hd: list[torch.Tensor], kw: list[dict]
    ) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]], bool]:
        """Run dense layer j: its output, its consumers' inputs and outputs, and whether the layer
        adds the consumers' outputs straight to the residual stream (out == in + sum of outputs)."""
        layer = self.dense[j]
        names = self._consumers(layer)
        xs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        ys: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        hooks = []
        for n in names:
            mod = layer.get_submodule(n)
            hooks.append(mod.register_forward_pre_hook(lambda _m, args, out=xs[n]: out.append(args[0])))
            hooks.append(mod.register_forward_hook(_appender(ys[n])))
        try:
            nxt = run_layer(layer, hd, kw)
        finally:
            for h in hooks:
                h.remove()
        direct = False
        if names and self.target == "residual":
            step = (nxt[0] - hd[0]).float().reshape(-1, nxt[0].shape[-1])  # OPT flattens tokens in its MLP
            gap = step - sum(ys[n][0].float().reshape(step.shape) for n in names)
            direct = float(gap.norm()) <= 1e-3 * float(step.norm()) + 1e-6
        return nxt, xs, ys, direct

    def restore(self, cand: Candidate) -> dict[str, dict[str, float]]:
        """Refit every consumer after `cand`; returns mean relative errors before/after per consumer kind."""
        a = self.adapter
        layers = a.layers(self.model)
        i = cand.layer
        self.undo = []
        start = i if cand.branches == ("attn",) and "mlp" in branch_params(self.model, a, i) else i + 1
        n_layers = len(layers)
        sums: dict[str, list[float]] = {}
        if start >= n_layers:
            return {}
        hp = self.inputs.hidden
        hd = self.inputs.hidden
        for j in range(n_layers):
            kw = self.inputs.kwargs[j]
            if j < start:
                hp = run_layer(layers[j], hp, kw)
                hd = run_layer(self.dense[j], hd, kw)
                continue
            hd_next, xd, yd, direct = self._dense_layer(j, hd, kw)
            names = self._consumers(layers[j])
            for k, n in enumerate(names):  # o_proj first: its refit changes down_proj's inputs
                before, after = self._fit(layers[j], j, n, names[:k], hp, hd, kw, xd, yd, direct)
                sums.setdefault(n.rsplit(".", 1)[-1], []).extend([before, after])
            hp = run_layer(layers[j], hp, kw)
            hd = hd_next
        return {
            k: {"pruned": statistics.fmean(v[0::2]), "restored": statistics.fmean(v[1::2])}
            for k, v in sums.items()
        }

    def _fit(
        self,
        layer: nn.Module,
        j: int,
        name: str,
        earlier: list[str],
        hp: list[torch.Tensor],
        hd: list[torch.Tensor],
        kw: list[dict],
        xd: dict[str, list[torch.Tensor]],
        yd: dict[str, list[torch.Tensor]],
        direct: bool,
    ) -> tuple[float, float]:
        """Refit consumer `name` of pruned layer j in place; `earlier` are the pruned consumers that add
        to the stream before it. Returns the relative errors before and after."""
        lin = layer.get_submodule(name)
        wd = self.dense[j].get_submodule(name).weight.float()
        dense_before = [e for e in yd if e == self.adapter.o and name == self.adapter.mlp_out]
        st = FitStats.empty(lin)
        y_prev: dict[str, list[torch.Tensor]] = {e: [] for e in earlier}
        batch = [0]

        def pre(_m: nn.Module, args: tuple) -> None:
            b = batch[0]
            batch[0] += 1
            x = xd[name][b].float()
            y = F.linear(x.reshape(-1, x.shape[-1]), wd)  # the dense consumer's output (biases are unchanged)
            if direct:  # plus the gap between the dense and pruned streams it adds into
                y = y + (hd[b] - hp[b]).float().reshape(y.shape)
                for e in dense_before:
                    y = y + yd[e][b].float().reshape(y.shape)
                for e in earlier:
                    y = y - y_prev[e][b].float().reshape(y.shape)
            st.add(args[0], y)

        hooks = [lin.register_forward_pre_hook(pre)]
        for e in earlier:
            hooks.append(layer.get_submodule(e).register_forward_hook(_appender(y_prev[e])))
        try:
            run_layer(layer, hp, kw)
        finally:
            for h in hooks:
                h.remove()
        w_new, before, after = refit(lin.weight, st, self.damping)
        if w_new is not None:  # a new Parameter, so `revert` can put the old one back without copies
            self.undo.append((lin, lin.weight))
            lin.weight = nn.Parameter(w_new.contiguous(), requires_grad=lin.weight.requires_grad)
        return before, after

    def revert(self) -> None:
        """Undo the last `restore` (the previous weights are still held, nothing is copied)."""
        for lin, old in reversed(self.undo):
            lin.weight = old
        self.undo = []


def _appender(out: list[torch.Tensor]):
    """A forward hook appending the module's output to `out`."""

    def hook(_m: nn.Module, _args: tuple, y: torch.Tensor) -> None:
        out.append(y)

    return hook
