"""The sequential layer-wise pass (SparseGPT / Wanda / FASP style) that executes a plan.

For each layer: run the calibration batches through it once while accumulating the
consuming projections' input statistics, score and select units, restore the consumers by
least squares, slice physically, then run the pruned layer to produce the next layer's
inputs. Only one layer's calibration activations are alive at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_groups, layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import LayerPlan, Plan, Scoring
from secateur.runtime.prune.capture import capture_inputs, run_layer
from secateur.runtime.prune.delta import mlp_only_recorder, patched_outputs
from secateur.runtime.prune.obs import obs_remove, obs_remove_channels
from secateur.runtime.prune.refine import BranchRecorder, refine_branch
from secateur.runtime.prune.restore import compensate_bias, restore_columns
from secateur.runtime.prune.score import consumer_site, unit_scores
from secateur.runtime.prune.select import by_score, kept_columns, select_units
from secateur.runtime.prune.stats import InputStats, PairedCollector, collect_inputs
from secateur.runtime.prune.surgery import apply_keep


@dataclass
class LayerLog:
    """What happened to one layer: kept units, time, reconstruction errors of its consumers."""

    layer: int
    seconds: float
    keep: dict
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class PruneResult:
    """Kept indices per layer (in the numbering the layer had when pruned), logs and phase times."""

    keep: dict[int, LayerKeep]
    logs: list[LayerLog]
    phases: dict[str, float]
    plan: Plan | None = None
    extra: dict = field(default_factory=dict)


def select_layer(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    lp: LayerPlan,
    stats: dict[str, InputStats],
    metric: str,
    selection: str = "score",
    damping: float = Scoring.damping,
) -> LayerKeep:
    """Keep the units of layer i the plan allows: best fixed scores, or OBS on the consumer's Gram."""
    groups = {g.kind: g for g in layer_groups(model, adapter, i)}
    p = adapter.layer_prefix(i)

    def consumer(kind: str) -> str:
        return f"{p}.{adapter.mlp_out if kind == 'mlp_channel' else adapter.o}"

    def score(kind: str) -> torch.Tensor:
        return unit_scores(model, groups[kind], stats.get(consumer(kind)), metric)

    def obs(kind: str, n_keep: int, partitions: int) -> list[int]:
        st = stats.get(consumer(kind))
        if st is None:
            raise ValueError(f"importance.selection: 'obs' needs calibration statistics of {consumer(kind)}")
        w = model.get_submodule(consumer(kind)).weight
        site = consumer_site(groups[kind])
        if kind == "mlp_channel" and site.width == 1:
            return obs_remove_channels(w, st.gram, n_keep, damping)
        units = [list(site.indices(u)) for u in range(groups[kind].n_units)]
        return obs_remove(w, st.gram, units, n_keep, partitions, damping)

    choose = obs if selection == "obs" else by_score(score)
    return select_units(lp, {k: g.n_units for k, g in groups.items()}, choose)


def kept_o_columns(lk: LayerKeep, shapes: dict) -> torch.Tensor:
    """Input columns of o_proj that survive a keep-set: kept heads x kept value channels of their group."""
    n_q, n_kv, dv = int(shapes["num_heads"]), int(shapes["num_kv_heads"]), int(shapes["v_head_dim"])
    r = n_q // n_kv
    heads = [
        h
        for h in (range(n_q) if lk.q_heads is None else lk.q_heads)
        if lk.kv_heads is None or h // r in lk.kv_heads
    ]
    chans = set(range(n_kv * dv)) if lk.v_channels is None else set(lk.v_channels)
    cols = [h * dv + c for h in sorted(heads) for c in range(dv) if (h // r) * dv + c in chans]
    return torch.tensor(cols, dtype=torch.long)


def restore_layer(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    lk: LayerKeep,
    stats: dict[str, InputStats],
    damping: float,
    method: str = Scoring.restore,
    errors: bool = True,
    correction: float = 1.0,
    consume: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict[str, dict[str, float]]]:
    """New consumer (weight, bias) pairs for layer i, computed before slicing.

    least_squares re-fits the kept columns; bias_compensation (FLAP) folds the pruned inputs'
    mean contribution into the bias (None: the bias is left as it is). `consume`: the Gram
    matrices are the solve's to overwrite (`restore_columns`), for a caller that drops `stats` next.
    """
    p = adapter.layer_prefix(i)
    sh = layer_shapes(model, adapter, i)
    cols: dict[str, torch.Tensor] = {}
    if lk.mlp is not None and not lk.drop_mlp:
        cols[f"{p}.{adapter.mlp_out}"] = kept_columns(lk.mlp, 1)
    if not lk.drop_attn and (lk.kv_heads is not None or lk.q_heads is not None or lk.v_channels is not None):
        cols[f"{p}.{adapter.o}"] = kept_o_columns(lk, sh)
    out, errs = {}, {}
    for name, keep_cols in cols.items():
        if name not in stats:  # activation-free scoring without restoration: plain slicing
            continue
        mod = model.get_submodule(name)
        st = stats[name]
        res = restore_columns(
            mod.weight,
            st.gram,
            keep_cols,
            damping,
            method == "least_squares",
            errors,
            st.cross,
            st.ref_energy,
            correction,
            consume,
        )
        bias = None
        if method == "bias_compensation":
            bias = compensate_bias(mod.weight, mod.bias, stats[name].mean, keep_cols)
        out[name] = (res.weight, bias)
        errs[name.rsplit(".", 1)[-1]] = {"pruned": res.err_pruned, "restored": res.err_restored}
    return out, errs


def write_consumers(model: nn.Module, new: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Copy restored weights into the (already sliced) consumers; add a bias where one is new."""
    for name, (w, b) in new.items():
        mod = model.get_submodule(name)
        mod.weight.data.copy_(w)
        if b is not None:  # a new tensor: the old bias may be shared with a search snapshot
            if mod.bias is None:
                mod.secateur_added_bias = True
            mod.bias = nn.Parameter(b.clone(), requires_grad=False)


def _refined_branch(
    model: nn.Module, adapter: ModelAdapter, i: int, lp: LayerPlan, plan: Plan
) -> BranchRecorder | None:
    """A recorder on layer i's MLP when the plan refines it (MLP pruned, refine_steps > 0)."""
    if plan.refine_steps <= 0 or lp.mlp is None or lp.drop_mlp or adapter.mlp_module is None:
        return None
    return BranchRecorder(model.get_submodule(f"{adapter.layer_prefix(i)}.{adapter.mlp_module}"))


def _refine(
    branch: BranchRecorder, layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict], plan: Plan
) -> dict[str, float]:
    """Record the pruned branch's inputs on the pruned stream, then refine it toward the recorded targets."""
    with branch.active():
        branch.record_inputs = True
        run_layer(layer, hidden, kwargs)
        branch.record_inputs = False
    out = refine_branch(branch.module, branch.inputs, branch.outputs, plan.refine_steps, plan.refine_lr)
    branch.inputs.clear()
    branch.outputs.clear()
    return {"pruned": out["heldout_before"], "restored": out["heldout_after"], "steps": out["steps"]}


def _consumers(model: nn.Module, adapter: ModelAdapter, i: int, lp: LayerPlan) -> dict[str, nn.Module]:
    """The consuming projections whose inputs layer i's plan needs (down_proj / o_proj)."""
    p = adapter.layer_prefix(i)
    out = {}
    if lp.mlp is not None and not lp.drop_mlp:
        out[f"{p}.{adapter.mlp_out}"] = model.get_submodule(f"{p}.{adapter.mlp_out}")
    attn_units = (lp.q_per_group, lp.kv_groups, lp.v_per_group)
    if any(x is not None for x in attn_units) and not lp.drop_attn:
        out[f"{p}.{adapter.o}"] = model.get_submodule(f"{p}.{adapter.o}")
    return out


def _statistics(
    layer: nn.Module,
    consumers: dict[str, nn.Module],
    hidden: list[torch.Tensor],
    dense_hidden: list[torch.Tensor] | None,
    kwargs: list[dict],
    branch: BranchRecorder | None,
    down: BranchRecorder | None = None,
) -> tuple[dict[str, InputStats], list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Consumer statistics of one layer (paired with the dense stream when it runs), recording the
    dense MLP branch's outputs when the branch is to be refined and the down projection's inputs
    and outputs when `down` is given. Returns the statistics, the dense stream's next inputs and
    this pass's own layer outputs (plain path only)."""
    with branch.active() if branch is not None else nullcontext():
        if dense_hidden is not None:
            return (*_paired_statistics(layer, consumers, hidden, dense_hidden, kwargs, branch), None)
        outs = None
        with collect_inputs(consumers) as stats, down.active() if down is not None else nullcontext():
            if branch is not None:
                branch.record_outputs = True  # the dense branch on the pruned stream
            if consumers:
                outs = run_layer(layer, hidden, kwargs)
            if branch is not None:
                branch.record_outputs = False
        return stats, None, outs


@torch.inference_mode()
def _paired_statistics(
    layer: nn.Module,
    consumers: dict[str, nn.Module],
    hidden: list[torch.Tensor],
    dense_hidden: list[torch.Tensor],
    kwargs: list[dict],
    branch: BranchRecorder | None = None,
) -> tuple[dict[str, InputStats], list[torch.Tensor]]:
    """Consumer statistics of the pruned stream against the dense stream, batch by batch, and the
    dense stream's outputs (the still-dense layer run on the dense inputs)."""
    collector = PairedCollector(consumers)
    outs = []
    with collector.active() as stats:
        for h, d, kw in zip(hidden, dense_hidden, kwargs):
            collector.reference()
            if branch is not None:
                branch.record_outputs = True  # the dense branch's output on the dense stream
            out = layer(d, **kw)
            if branch is not None:
                branch.record_outputs = False
            outs.append(out[0] if isinstance(out, tuple) else out)
            collector.accumulate()
            layer(h, **kw)
    return stats, outs


class LayerIO(Protocol):
    """Where layer weights come from and go (the streaming runtime): `load(i)` before layer i
    runs, `done(i)` once its outputs are computed. `dense()` is the read-only counterpart for a
    statistics pass over the dense layers before pruning (each read, then dropped, nothing written).
    `weights_fingerprint()` is the dense weights' fingerprint read from where the layers come from
    (None: the model in memory holds every layer, hash it there)."""

    def load(self, i: int) -> None: ...

    def done(self, i: int) -> None: ...

    def dense(self) -> LayerIO: ...

    def weights_fingerprint(self) -> str | None: ...


class _Resident:
    """Every layer already in memory: nothing to load or write."""

    def load(self, i: int) -> None:
        return None

    def done(self, i: int) -> None:
        return None

    def dense(self) -> LayerIO:
        return self

    def weights_fingerprint(self) -> str | None:
        return None


def resident_layers() -> LayerIO:
    """The LayerIO of a model whose layers are all in memory (every hook a no-op)."""
    return _Resident()


def needs_statistics(plan: Plan) -> bool:
    """Whether the plan's scoring or restoration reads calibration statistics."""
    return plan.metric != "magnitude" or plan.restore != "none" or plan.selection != "score"


def prune_sequential(
    model: nn.Module,
    adapter: ModelAdapter,
    calib_ids: torch.Tensor,
    plan: Plan,
    batch_size: int = 8,
    progress: bool = True,
    on_layer: Callable[[LayerLog], None] | None = None,
    layer_io: LayerIO | None = None,
) -> PruneResult:
    """Execute `plan` on `model` in place, layer by layer, with FASP scoring and restoration
    (`layer_io`: layers read before and written after their turn, for streaming)."""
    phases = {"capture": 0.0, "statistics": 0.0, "scoring": 0.0, "restoration": 0.0, "forward": 0.0}
    t0 = time.perf_counter()
    io = layer_io or _Resident()
    if not needs_statistics(plan):
        return _prune_without_data(model, adapter, plan, phases, t0, io)
    inputs = capture_inputs(model, adapter, calib_ids, batch_size)
    phases["capture"] = time.perf_counter() - t0
    hidden = inputs.hidden
    dense_hidden = (
        list(hidden) if plan.error_correction > 0 else None
    )  # the dense stream, beside the pruned one
    layers = adapter.layers(model)
    logs: list[LayerLog] = []
    keep: dict[int, LayerKeep] = {}
    bar = tqdm(range(len(layers)), desc="pruning", unit="layer", disable=not progress)
    for i in bar:
        t_layer = time.perf_counter()
        io.load(i)
        lp = plan.layers.get(i, LayerPlan())
        errors: dict[str, dict[str, float]] = {}
        down = outs = None
        if not lp.is_noop():
            consumers = _consumers(model, adapter, i, lp)
            branch = _refined_branch(model, adapter, i, lp, plan)
            if branch is None and dense_hidden is None:
                down = mlp_only_recorder(model, adapter, i, lp, hidden)
            t = time.perf_counter()
            stats, dense_hidden, outs = _statistics(
                layers[i], consumers, hidden, dense_hidden, inputs.kwargs[i], branch, down
            )
            phases["statistics"] += time.perf_counter() - t
            lk, errors = _select_and_restore(model, adapter, i, lp, stats, plan, phases)
            keep[i] = lk
            del stats
            if branch is not None:
                t = time.perf_counter()
                errors["refine"] = _refine(branch, layers[i], hidden, inputs.kwargs[i], plan)
                phases["refine"] = phases.get("refine", 0.0) + time.perf_counter() - t
        elif dense_hidden is not None:
            t = time.perf_counter()
            dense_hidden = run_layer(layers[i], dense_hidden, inputs.kwargs[i])
            phases["statistics"] += time.perf_counter() - t
        t = time.perf_counter()
        if down is not None and outs is not None and i in keep and keep[i].mlp is not None:
            hidden = patched_outputs(outs, down, keep[i].mlp)  # no second forward (runtime/prune/delta.py)
        else:
            hidden = run_layer(layers[i], hidden, inputs.kwargs[i])
        down = outs = None
        phases["forward"] += time.perf_counter() - t
        io.done(i)
        log = LayerLog(i, time.perf_counter() - t_layer, keep[i].to_dict() if i in keep else {}, errors)
        logs.append(log)
        if errors:
            bar.set_postfix(
                {k: f"{v['pruned']:.3f}->{v['restored']:.3f}" for k, v in errors.items() if "pruned" in v}
            )
        if on_layer is not None:
            on_layer(log)
    phases["total"] = time.perf_counter() - t0
    return PruneResult(keep, logs, phases, plan)


def _select_and_restore(
    model: nn.Module,
    adapter: ModelAdapter,
    i: int,
    lp: LayerPlan,
    stats: dict[str, InputStats],
    plan: Plan,
    phases: dict[str, float],
) -> tuple[LayerKeep, dict[str, dict[str, float]]]:
    """Layer i's kept units chosen from its statistics, the layer sliced and its consumers restored."""
    t = time.perf_counter()
    lk = select_layer(model, adapter, i, lp, stats, plan.metric, plan.selection, plan.damping)
    phases["scoring"] += time.perf_counter() - t
    t = time.perf_counter()
    new_w, errors = restore_layer(
        model,
        adapter,
        i,
        lk,
        stats,
        plan.damping,
        plan.restore,
        correction=float(plan.error_correction),
        consume=True,  # the statistics are dropped after this layer (`prune_sequential`)
    )
    apply_keep(model, adapter, {i: lk})
    write_consumers(model, new_w)
    phases["restoration"] += time.perf_counter() - t
    return lk, errors


def _prune_without_data(
    model: nn.Module, adapter: ModelAdapter, plan: Plan, phases: dict[str, float], t0: float, io: LayerIO
) -> PruneResult:
    """Weight-only plans (magnitude, no restoration) read no activations: skip every forward."""
    keep: dict[int, LayerKeep] = {}
    logs: list[LayerLog] = []
    for i in range(adapter.num_layers):
        lp = plan.layers.get(i, LayerPlan())
        io.load(i)
        if not lp.is_noop():
            t = time.perf_counter()
            keep[i] = select_layer(model, adapter, i, lp, {}, plan.metric)
            apply_keep(model, adapter, {i: keep[i]})
            phases["scoring"] += time.perf_counter() - t
            logs.append(LayerLog(i, time.perf_counter() - t, keep[i].to_dict(), {}))
        io.done(i)
    phases["total"] = time.perf_counter() - t0
    return PruneResult(keep, logs, phases, plan)
