"""Sublayer removal: BlockPruner and SPRINT remove whole attention / MLP branches greedily.

BlockPruner (Zhong et al., 2024): at every step, score each remaining candidate (the attention
or MLP branch of an eligible layer; both at once with `targets.blocks`) by the quality of the
model without it on held-out windows (disjoint from calibration), remove the best one
physically, repeat until the parameter budget is met. Quality is the mean KL divergence to
the next-token distribution of the model entering the stage (default), or perplexity with
`importance.metric: ppl_delta`.

SPRINT: the same greedy loop, but a candidate's score is its quality increase divided by the
latency it saves, read from a per-sublayer latency table measured once on this device and
cached as JSON. After each removal the following sublayers' consumers (o_proj, down_proj) are
refitted by least squares against the dense model (the model entering the stage, run in
lockstep on calibration windows): each consumer's new output should equal the dense
consumer's output plus the gap between the dense and pruned residual streams it adds into
(see `Restorer`), a training-free stand-in for the paper's quick tuning. A refit is kept only
when it lowers the held-out proxy; otherwise the previous weights are put back.

Cost: the hidden states entering every layer on the held-out windows are kept for the current
model, so scoring a candidate in layer i runs only layers i..L-1, the final norm and the LM
head (half a forward on average). Removing a candidate temporarily swaps modules (no weight
copies) and puts the originals back. After a removal only layers from the removed one on are
re-run to refresh the cached hidden states.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import linear_params
from secateur.graph.groups import has_submodule, is_skipped, layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.recipe.schema import Stage, Targets
from secateur.runtime.allocation.proxy import HeldoutScorer, dense_reference
from secateur.runtime.measure.timing import sync
from secateur.runtime.methods.registry import register_method
from secateur.runtime.prune.capture import LayerInputs, capture_inputs, run_layer
from secateur.runtime.prune.restore import solve_damped
from secateur.runtime.prune.sequential import LayerLog, PruneResult
from secateur.runtime.prune.snapshot import ModuleSnapshot
from secateur.runtime.prune.stage import CheckContext, StageContext
from secateur.runtime.prune.surgery import apply_keep, drop_attention, drop_mlp

BRANCHES = ("attn", "mlp")
BATCH_SIZE = 4  # held-out windows per forward while scoring
REFERENCE_MB = 256  # dense reference kept in full below this size, else as top-k log-probabilities
REFERENCE_TOPK = 256
RESTORE_WINDOWS = 16  # calibration windows used by SPRINT's least-squares restoration
LATENCY_SEQLEN = 512
LATENCY_REPEATS = 5
LATENCY_FLOOR_S = 1e-6  # a branch never counts as saving less than this (noise guard)
LATENCY_FORMAT = 1


# ---- candidates and budget ----------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """Branches of one layer removed together: ("attn",), ("mlp",) or both (a block)."""

    layer: int
    branches: tuple[str, ...]

    @property
    def name(self) -> str:
        return "block" if len(self.branches) == 2 else self.branches[0]

    def keep(self) -> LayerKeep:
        return LayerKeep(drop_attn="attn" in self.branches, drop_mlp="mlp" in self.branches)


def branch_params(model: nn.Module, adapter: ModelAdapter, i: int) -> dict[str, int]:
    """Decoder linear parameters (the budget's unit) of each branch layer i still has."""
    # layer_shapes, not graph.groups.sublayer_groups: the latter reads `.weight` of branch norms,
    # which fails once a branch is removed (its norms are Identity)
    sh = layer_shapes(model, adapter, i)
    layer = adapter.layers(model)[i]
    out: dict[str, int] = {}
    if not sh["skip_attention"]:
        out["attn"] = linear_params(layer.get_submodule(adapter.attn))
    if not sh["skip_mlp"]:
        out["mlp"] = sum(linear_params(layer.get_submodule(m)) for m in (*adapter.mlp_in, adapter.mlp_out))
    return out


def candidates(
    model: nn.Module, adapter: ModelAdapter, layers: list[int], targets: Targets
) -> list[Candidate]:
    """Remaining candidates: branches with `targets.sublayers`, whole blocks with `targets.blocks`."""
    out: list[Candidate] = []
    for i in layers:
        present = tuple(b for b in BRANCHES if b in branch_params(model, adapter, i))
        if targets.sublayers:
            out += [Candidate(i, (b,)) for b in present]
        if targets.blocks and present and not (targets.sublayers and len(present) == 1):
            out.append(Candidate(i, present))
    return out


def _where(stage: Stage) -> str:
    """'stage passes.1' for a pass, 'top-level stage' for a recipe without passes."""
    path = getattr(stage, "path", ())
    return "stage " + ".".join(str(p) for p in path) if path else "top-level stage"


def check_budget(
    model: nn.Module,
    adapter: ModelAdapter,
    method: str,
    stage: Stage,
    params_to_remove: int,
    layers: list[int],
) -> int:
    """Fail early (from group sizes, no data touched) when sublayer removal cannot meet the budget.

    Returns the parameters removable as whole sublayers in the eligible layers.
    """
    where = _where(stage)
    t = stage.targets
    if not (t.sublayers or t.blocks):
        raise ValueError(
            f"{method} ({where}): targets.sublayers and targets.blocks are both false, so there is "
            f"nothing this method can remove; set targets.sublayers: true (attention and MLP branches) or "
            f"targets.blocks: true (whole layers)"
        )
    removable = sum(sum(branch_params(model, adapter, i).values()) for i in layers)
    if params_to_remove > removable:
        share = " or this pass's share" if where.startswith("stage passes") else ""
        raise ValueError(
            f"{method} ({where}): budget.params asks this stage to remove {params_to_remove:,} parameters, "
            f"but removing every remaining attention and MLP sublayer of its {len(layers)} eligible layers "
            f"removes only {removable:,}; lower budget.params{share} or widen targets.layers / targets.protect"
        )
    return removable


@contextmanager
def without(model: nn.Module, adapter: ModelAdapter, cand: Candidate) -> Iterator[None]:
    """The model with `cand` removed inside the block, exactly as before after it (no weight copies):
    the branch module becomes SkippedAttention / SkippedMLP, its norms Identity, then all is put back."""
    layer = adapter.layers(model)[cand.layer]
    snap = ModuleSnapshot([layer])
    try:
        with torch.no_grad():
            if "attn" in cand.branches:
                drop_attention(model, adapter, cand.layer)
            if "mlp" in cand.branches:
                drop_mlp(model, adapter, cand.layer)
        yield
    finally:
        snap.restore()


# ---- held-out proxy with cached layer inputs ----------------------------------------------------


# ---- SPRINT: latency table ----------------------------------------------------------------------


def _signature(model: nn.Module, adapter: ModelAdapter, i: int) -> str:
    """What a layer's latency depends on: its shapes and attention type (sliding or full)."""
    sh = dict(layer_shapes(model, adapter, i))
    types = getattr(model.config, "layer_types", None)
    sh["type"] = types[i] if types is not None and i < len(types) else "full_attention"
    if sh["type"] == "sliding_attention":
        sh["window"] = getattr(model.config, "sliding_window", None)
    return json.dumps(sh, sort_keys=True)


def _device_tag(dev: torch.device) -> str:
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    return dev.type


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/secateur, else ~/.cache/secateur."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "secateur"


@dataclass
class LatencyTable:
    """Seconds each branch of each layer costs on [1, seqlen] hidden states, and where it is cached."""

    per_layer: dict[int, dict[str, float]]
    path: Path
    cached: bool
    seconds: float
    seqlen: int

    def saved(self, cand: Candidate) -> float:
        return sum(self.per_layer[cand.layer].get(b, 0.0) for b in cand.branches)


def _measure(
    model: nn.Module, adapter: ModelAdapter, i: int, inputs: LayerInputs, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of layer i's attention and MLP branches: layer with one branch minus layer with none,
    variants timed alternately round by round."""
    present = tuple(b for b in BRANCHES if b in branch_params(model, adapter, i))
    layer = adapter.layers(model)[i]
    dev = inputs.hidden[0].device
    variants = {b: tuple(o for o in present if o != b) for b in present}  # keep b only
    variants["none"] = present
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(warmup + repeats):
        for name, drop in variants.items():
            with without(model, adapter, Candidate(i, drop)) if drop else nullcontext():
                sync(dev)
                t = time.perf_counter()
                run_layer(layer, inputs.hidden, inputs.kwargs[i])
                sync(dev)
                if r >= warmup:
                    times[name].append(time.perf_counter() - t)
    base = statistics.median(times["none"])
    return {b: max(statistics.median(times[b]) - base, LATENCY_FLOOR_S) for b in present}


def latency_table(
    model: nn.Module,
    adapter: ModelAdapter,
    cache_dir: str | Path | None = None,
    seqlen: int = LATENCY_SEQLEN,
    repeats: int = LATENCY_REPEATS,
) -> LatencyTable:
    """Per-layer branch latencies, measured once per distinct layer shape on this device and cached
    as JSON (`cache_dir`, else ~/.cache/secateur) under latency-<model_type>-<device>-<shape hash>.json."""
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n = min(seqlen, int(getattr(model.config, "max_position_embeddings", seqlen) or seqlen))
    sigs = {i: _signature(model, adapter, i) for i in range(adapter.num_layers)}
    keys = {s: hashlib.sha1(s.encode()).hexdigest()[:12] for s in set(sigs.values())}
    ident = {
        "hidden_size": adapter.hidden_size,
        "dtype": str(dtype).replace("torch.", ""),
        "seqlen": n,
        "device": _device_tag(dev),
        "threads": torch.get_num_threads() if dev.type == "cpu" else None,
        "layers": sorted(keys.values()),
    }
    shape_hash = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model_type = str(getattr(model.config, "model_type", "model"))
    path = folder / f"latency-{model_type}-{_device_tag(dev)}-{shape_hash}.json"
    entries: dict[str, dict[str, float]] = {}
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("format") == LATENCY_FORMAT and data.get("ident") == ident:
                entries = data["entries"]
        except (OSError, ValueError, KeyError):
            entries = {}
    missing = [s for s, k in keys.items() if k not in entries]
    if missing:
        ids = torch.randint(
            0, int(model.config.vocab_size), (1, n), generator=torch.Generator().manual_seed(0)
        ).to(dev)
        inputs = capture_inputs(model, adapter, ids, 1)
        for s in missing:
            rep = min(i for i, v in sigs.items() if v == s)
            entries[keys[s]] = _measure(model, adapter, rep, inputs, repeats)
        folder.mkdir(parents=True, exist_ok=True)
        doc = {"format": LATENCY_FORMAT, "model_type": model_type, "ident": ident, "entries": entries}
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, path)
    per_layer = {i: dict(entries[keys[s]]) for i, s in sigs.items()}
    return LatencyTable(per_layer, path, not missing, time.perf_counter() - t0, n)


# ---- SPRINT: least-squares restoration against the dense model ---------------------------------


@dataclass
class _FitStats:
    """Running sums for min ||X_p W'^T - Y||^2 over W' (tokens as rows): X_p^T X_p, Y^T X_p, ||Y||^2."""

    gram: torch.Tensor
    cross: torch.Tensor
    yy: float = 0.0

    @classmethod
    def empty(cls, lin: nn.Linear) -> _FitStats:
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


def refit(w_pruned: torch.Tensor, st: _FitStats, damping: float) -> tuple[torch.Tensor | None, float, float]:
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
        st = _FitStats.empty(lin)
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


# ---- the greedy loop ----------------------------------------------------------------------------


@dataclass
class _Step:
    cand: Candidate
    params: int
    proxy: float
    score: float
    seconds: float
    restore_s: float = 0.0
    kept_restoration: bool = False
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


class _Greedy:
    """One BlockPruner / SPRINT stage: setup in the constructor, then a method per phase of a step."""

    def __init__(self, ctx: StageContext, method: str, latency_aware: bool) -> None:
        """Setup: budget check, metric, phase timers, the extra's header and the per-step accumulators."""
        self.t0 = time.perf_counter()
        self.ctx, self.method, self.latency_aware = ctx, method, latency_aware
        self.model, self.adapter, self.stage = ctx.model, ctx.adapter, ctx.stage
        removable = check_budget(
            self.model, self.adapter, method, self.stage, int(ctx.params_to_remove), ctx.layers
        )
        self.kind = "ppl" if self.stage.importance.metric == "ppl_delta" else "kl"
        self.n_layers = self.adapter.num_layers
        self.phases = {
            "latency": 0.0,
            "reference": 0.0,
            "capture": 0.0,
            "scoring": 0.0,
            "removal": 0.0,
            "restoration": 0.0,
        }
        self.extra: dict[str, Any] = {
            "method": method,
            "metric": self.kind,
            "params_to_remove": int(ctx.params_to_remove),
            "removable_params": int(removable),
            "heldout": f"{ctx.heldout.shape[0]} x {ctx.heldout.shape[1]}",
        }
        self.table: LatencyTable | None = None
        self.restorer: Restorer | None = None
        if ctx.params_to_remove > 0:
            self._prepare()
        self.keep: dict[int, LayerKeep] = {}
        self.logs: list[LayerLog] = []
        self.steps: list[_Step] = []
        self.removed = 0
        self.n_evals, self.eval_s, self.depth = 0, 0.0, 0.0

    def _prepare(self) -> None:
        """Latency table (SPRINT), dense reference, restorer (SPRINT), scorer and the starting proxy."""
        ctx, model, adapter, stage = self.ctx, self.model, self.adapter, self.stage
        if self.latency_aware:
            self.table = table = latency_table(model, adapter, ctx.cache_dir)
            self.phases["latency"] = table.seconds
            where = "read from" if table.cached else "measured and written to"
            ctx.log(f"{self.method}: latency table {where} {table.path}")
        t = time.perf_counter()
        ref = (
            dense_reference(model, ctx.heldout, BATCH_SIZE, REFERENCE_MB, REFERENCE_TOPK)
            if self.kind == "kl"
            else None
        )
        self.phases["reference"] = time.perf_counter() - t
        if self.latency_aware and stage.restore.method == "least_squares":
            t = time.perf_counter()
            self.restorer = Restorer(
                model, adapter, ctx.calib[:RESTORE_WINDOWS], stage.restore.damping, BATCH_SIZE
            )
            self.phases["restoration"] += time.perf_counter() - t
        t = time.perf_counter()
        self.scorer = HeldoutScorer(model, adapter, ctx.heldout, ref, self.kind)
        self.current = self.scorer.value(self.n_layers)
        self.phases["capture"] = time.perf_counter() - t

    def step(self) -> None:
        """One greedy step: score every remaining candidate, remove the best, restore, refresh, log."""
        t_step = time.perf_counter()
        cands = candidates(self.model, self.adapter, self.ctx.layers, self.stage.targets)
        if not cands:  # cannot happen after check_budget; kept as a guard against surprises
            raise ValueError(
                f"{self.method} ({_where(self.stage)}): no sublayer left to remove at {self.removed:,} params"
            )
        score, v, c = self._best(cands)
        self.phases["scoring"] += time.perf_counter() - t_step
        step = self._remove(c, v, score)
        self.current = v  # the candidate's own score is the model's proxy now
        if self.restorer is not None:
            self._restore(step, v, self.restorer)
        t = time.perf_counter()
        if self.restorer is None or not step.kept_restoration:
            self.scorer.refresh(c.layer)
        step.proxy = self.current
        self.phases["capture"] += time.perf_counter() - t
        step.seconds = time.perf_counter() - t_step
        self.steps.append(step)
        self.logs.append(LayerLog(c.layer, step.seconds, c.keep().to_dict(), step.errors))
        self._log(step, v)

    def _best(self, cands: list[Candidate]) -> tuple[float, float, Candidate]:
        """Score every candidate (proxy without it, per latency saved for SPRINT); the lowest wins."""
        best: tuple[float, float, Candidate] | None = None
        bar = tqdm(
            cands,
            desc=f"{self.method} step {len(self.steps) + 1}",
            unit="cand",
            leave=False,
            disable=not self.ctx.progress,
        )
        for c in bar:
            tc = time.perf_counter()
            with without(self.model, self.adapter, c):
                v = self.scorer.value(c.layer)
            self.eval_s += time.perf_counter() - tc
            self.n_evals += 1
            self.depth += (self.n_layers - c.layer) / self.n_layers
            score = (v - self.current) / self.table.saved(c) if self.table is not None else v
            if best is None or score < best[0]:
                best = (score, v, c)
                bar.set_postfix({"best": f"{c.name}@{c.layer}", self.kind: f"{v:.4g}"})
        assert best is not None
        return best

    def _remove(self, c: Candidate, v: float, score: float) -> _Step:
        """Remove the chosen candidate physically and record it in the stage's keep-sets."""
        t = time.perf_counter()
        params = sum(
            n for b, n in branch_params(self.model, self.adapter, c.layer).items() if b in c.branches
        )
        apply_keep(self.model, self.adapter, {c.layer: c.keep()})
        lk = self.keep.setdefault(c.layer, LayerKeep())
        lk.drop_attn |= "attn" in c.branches
        lk.drop_mlp |= "mlp" in c.branches
        self.removed += params
        self.phases["removal"] += time.perf_counter() - t
        return _Step(c, params, v, score, 0.0)

    def _restore(self, step: _Step, v: float, restorer: Restorer) -> None:
        """SPRINT's least-squares refit after a removal, kept only when it lowers the held-out proxy."""
        t = time.perf_counter()
        c = step.cand
        step.errors = restorer.restore(c)
        self.scorer.refresh(c.layer)
        v_restored = self.scorer.value(self.n_layers)
        # least squares on calibration windows can still hurt the held-out proxy (outlier channels
        # dominate squared errors): keep the refit only when it helps there
        step.kept_restoration = v_restored < v
        if step.kept_restoration:
            self.current = v_restored
        else:
            restorer.revert()
        step.restore_s = time.perf_counter() - t
        self.phases["restoration"] += step.restore_s

    def _log(self, step: _Step, v: float) -> None:
        """The step's log line: what went, the budget so far, the proxy and the restoration's verdict."""
        c, kind = step.cand, self.kind
        restored = ""
        if self.restorer is not None:
            fits = " ".join(f"{k} {e['pruned']:.3f}->{e['restored']:.3f}" for k, e in step.errors.items())
            verdict = "kept" if step.kept_restoration else f"reverted ({kind} {v:.4f} without it)"
            restored = f", restoration {fits or '(nothing after it)'} {verdict}"
        self.ctx.log(
            f"{self.method} step {len(self.steps)}: removed layers.{c.layer}.{c.name} ({step.params:,} params, "
            f"{self.removed:,}/{int(self.ctx.params_to_remove):,} so far), {kind} {self.current:.4f}{restored}, "
            f"{step.seconds:.1f}s"
        )

    def result(self) -> PruneResult:
        """The stage's keep-sets, layer logs, phases and extra (removals, costs, SPRINT's details)."""
        steps, n_evals = self.steps, self.n_evals
        self.phases["total"] = time.perf_counter() - self.t0
        extra = self.extra
        extra.update(
            {
                "removed": [[b, s.cand.layer] for s in steps for b in s.cand.branches],
                "removed_params": int(self.removed),
                "removed_params_per_step": [int(s.params) for s in steps],
                "proxy_per_step": [float(s.proxy) for s in steps],
                "steps": len(steps),
                "candidate_evals": n_evals,
                "seconds_per_candidate": self.eval_s / n_evals if n_evals else 0.0,
                "seconds_per_step": statistics.fmean(s.seconds for s in steps) if steps else 0.0,
                # what a candidate evaluation runs: this share of the decoder layers (+ final norm and LM head)
                "forward_fraction_per_candidate": self.depth / n_evals if n_evals else 0.0,
            }
        )
        if n_evals:
            extra["step_cost"] = (
                f"{n_evals / len(steps):.1f} candidates per step, each running {extra['forward_fraction_per_candidate']:.2f} "
                f"of the decoder layers + LM head on {extra['heldout']} held-out tokens "
                f"({extra['seconds_per_candidate']:.3g} s per candidate)"
            )
        if self.latency_aware:
            self._sprint_extra()
        return PruneResult(self.keep, self.logs, self.phases, None, extra)

    def _sprint_extra(self) -> None:
        """SPRINT's entries in the extra: restoration per step and the latency table used."""
        extra, stage, steps, table = self.extra, self.stage, self.steps, self.table
        extra["restore"] = stage.restore.method if stage.restore.method == "least_squares" else "none"
        extra["restoration_s"] = self.phases["restoration"]
        extra["restoration_s_per_step"] = [float(s.restore_s) for s in steps]
        extra["restoration_kept_per_step"] = [bool(s.kept_restoration) for s in steps]
        extra["restore_windows"] = self.restorer.windows if self.restorer is not None else 0
        if table is not None:
            extra["latency_table"] = {
                str(i): {k: float(v) for k, v in d.items()} for i, d in table.per_layer.items()
            }
            extra["latency_cache"] = str(table.path)
            extra["latency_cached"] = table.cached
            extra["latency_seqlen"] = table.seqlen


def greedy_removal(ctx: StageContext, method: str, latency_aware: bool) -> PruneResult:
    """BlockPruner (latency_aware=False) or SPRINT (True) on `ctx.model`, in place."""
    run = _Greedy(ctx, method, latency_aware)
    while run.removed < ctx.params_to_remove:
        run.step()
    return run.result()


def _check(method: str):
    def check(ctx: CheckContext) -> None:
        check_budget(ctx.model, ctx.adapter, method, ctx.stage, ctx.params_to_remove, ctx.layers)

    return check


@register_method("blockpruner", check=_check("blockpruner"))
def blockpruner(ctx: StageContext) -> PruneResult:
    """BlockPruner: greedy removal of the attention / MLP sublayer that hurts held-out quality least."""
    return greedy_removal(ctx, "blockpruner", latency_aware=False)


@register_method("sprint", check=_check("sprint"))
def sprint(ctx: StageContext) -> PruneResult:
    """SPRINT: greedy removal by quality lost per latency saved, least-squares restoration after each step."""
    return greedy_removal(ctx, "sprint", latency_aware=True)
