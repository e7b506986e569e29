"""`secateur recipe explain`: compile a recipe against a model's shapes only, in seconds.

The model is built from its config on the meta device (no weights read, no calibration);
the plan is applied to that skeleton with placeholder unit choices to count what remains.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.checks import check_streamable, load_skeleton, plan_stages
from secateur.export import check_exports
from secateur.graph.adapters import ModelAdapter
from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.graph.groups import layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.graph.plan import LayerPlan, Plan
from secateur.recipe.compile import allocate, budget_spec, check_shapes, table_fractions
from secateur.recipe.schema import Recipe, Stage
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.speed.latency import PHASES, LatencyModel
from secateur.runtime.store.loader import DTYPES, resolve_source
from secateur.runtime.store.stream import mapped_resident, memory_bound
from secateur.speed_target import dense_probe, resolve_speed


def placeholder_keep(model: nn.Module, adapter: ModelAdapter, i: int, lp: LayerPlan) -> LayerKeep:
    """A keep-set with the plan's counts (first units), for counting shapes without scores."""
    sh = layer_shapes(model, adapter, i)
    n_q, n_kv = int(sh["num_heads"]), int(sh["num_kv_heads"])
    r = n_q // max(n_kv, 1)
    lk = LayerKeep(drop_attn=lp.drop_attn, drop_mlp=lp.drop_mlp)
    if lp.mlp is not None and not lp.drop_mlp:
        lk.mlp = list(range(lp.mlp))
    if not lp.drop_attn and lp.v_per_group is not None:
        dv = int(sh["v_head_dim"])
        lk.v_channels = [g * dv + c for g in range(n_kv) for c in range(lp.v_per_group)]
    if not lp.drop_attn and (lp.kv_groups is not None or lp.q_per_group is not None):
        kv = lp.kv_groups if lp.kv_groups is not None else n_kv
        per = lp.q_per_group if lp.q_per_group is not None else r
        lk.kv_heads = list(range(kv))
        lk.q_heads = [g * r + j for g in range(kv) for j in range(per)]
    return lk


def apply_plan_shapes(model: nn.Module, adapter: ModelAdapter, plan: Plan) -> None:
    """Cut a (skeleton) model to the plan's widths."""
    apply_keep(model, adapter, {i: placeholder_keep(model, adapter, i, lp) for i, lp in plan.layers.items()})


@dataclass
class Explanation:
    """The plan with per-layer widths and before/after totals."""

    plans: list[Plan]
    rows: list[dict[str, Any]]
    totals: dict[str, dict[str, int]]
    stages: list[dict[str, Any]]
    exports: list[str] = field(default_factory=list)
    stream: dict[str, int] | None = None  # runtime.store.stream.memory_bound terms when model.stream is set
    serving: list[str] = field(default_factory=list)  # target, width step, speed goal
    latency: dict[str, Any] | None = None  # predicted per-layer and total times (speed goal or --latency)
    stream_mapped: bool = (
        False  # embeddings/head read in place from the file (runtime.store.stream.mapped_resident)
    )


def stage_summary(st: Stage, count: int, layers: list[int]) -> dict[str, Any]:
    """One stage as `recipe explain` lists it: method, budget, its options and its heal."""
    out: dict[str, Any] = {"method": st.method, "params_to_remove": count, "layers": len(layers)}
    if st.heal is not None:
        h = st.heal
        out["heal"] = (
            f"then heal: {h.steps} steps x {h.batch} x {h.seqlen} = {h.steps * h.batch * h.seqlen:,} tokens of "
            f"{'self-generated text' if h.data.dataset == 'self' else h.data.dataset}, train {h.train}, "
            f"teacher top-{h.top_k}"
        )
    if st.spec.sequential:
        r = st.restore
        out["options"] = (
            f"metric {st.importance.metric}, selection {st.importance.selection}, restore {r.method}"
            + (f", error correction {r.error_correction:g}" if r.error_correction else "")
            + (f", MLP refinement {r.refine_steps} steps" if r.refine_steps else "")
        )
    return out


def explain(
    recipe: Recipe,
    model_ref: str | None = None,
    base_dir: str | Path | None = None,
    context: int | None = None,
    latency: bool = False,
    log: Callable[[str], None] | None = None,
) -> Explanation:
    """Compile every stage of `recipe` against a model's shapes and describe the result.

    FASP stages are compiled exactly; stages whose choices depend on calibration data
    (sublayer removal, global rankings) are listed with their parameter budget only.
    """
    model, adapter = load_skeleton(model_ref or recipe.model.id, base_dir)
    speed_goal = recipe.budget.latency_goal is not None
    recipe, speed = resolve_speed(recipe, model, adapter, log)
    context = context or recipe.budget.context
    pruned = copy.deepcopy(model)
    plans: list[Plan] = []
    stages: list[dict[str, Any]] = []
    for st, count, layers in plan_stages(recipe, model, adapter):
        stages.append(stage_summary(st, count, layers))
        if not st.spec.planned or recipe.allocation.method in ("global", "proportional"):
            stages[-1]["note"] = "units chosen from calibration data at prune time"
            continue
        spec = budget_spec(recipe, st.targets, count=count)
        check_shapes(pruned, adapter, spec, layers)
        fixed = {}
        if recipe.allocation.method == "table":
            fixed = {
                i: f
                for i, f in table_fractions(recipe.allocation.table, adapter.num_layers).items()
                if i in layers
            }
        sc = st.scoring
        plan = allocate(pruned, adapter, spec, layers, fixed, sc.metric, sc.restore, sc.damping)
        apply_plan_shapes(pruned, adapter, plan)
        plans.append(plan)
    rows = []
    for i in range(adapter.num_layers):
        a, b = layer_shapes(model, adapter, i), layer_shapes(pruned, adapter, i)
        rows.append({"layer": i, "dense": a, "pruned": b})

    def totals(m: nn.Module) -> dict[str, int]:
        return {
            "params": total_params(m),
            "decoder_linear_params": decoder_linear_params(m, adapter),
            "flops_per_token": flops_per_token(m, adapter, context),
        }

    exports = check_exports(recipe, adapter, Path(base_dir) if base_dir is not None else None)
    stream, mapped = None, set()
    if recipe.model.stream:
        check_streamable(recipe)
        c = recipe.calibration
        dtype = DTYPES.get(recipe.model.dtype, torch.float32)
        corr = any(st.restore.error_correction > 0 for st in recipe.stages())
        src = resolve_source(model_ref or recipe.model.id, str(base_dir) if base_dir else None)
        device = recipe.model.device
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        mapped = mapped_resident(src.path, model, adapter, dtype) if on_cpu and not src.gguf_file else set()
        stream = memory_bound(model, adapter, dtype, c.n_samples * c.seqlen, corr, mapped)
    ex = Explanation(plans, rows, {"dense": totals(model), "pruned": totals(pruned)}, stages, exports, stream)
    ex.stream_mapped = bool(mapped)
    ex.serving = speed.lines()
    if latency or speed_goal:
        lat = speed.latency or LatencyModel.build(
            speed.target, dense_probe(adapter), int(recipe.budget.multiple_of), recipe.budget.min_keep, log
        )
        ex.latency = predicted_latency(lat, rows)
    return ex


def predicted_latency(lat: LatencyModel, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The latency model's per-layer and whole-model times, dense and as planned."""
    per_layer = [
        {p: (lat.shape_time(r["dense"], p), lat.shape_time(r["pruned"], p)) for p in PHASES} for r in rows
    ]
    dense = lat.predict([r["dense"] for r in rows])
    pruned = lat.predict([r["pruned"] for r in rows])
    return {"target": lat.target.describe(), "layers": per_layer, "dense": dense, "pruned": pruned}


def total_lines(d: dict[str, int], p: dict[str, int], pending: int) -> list[str]:
    """Dense -> planned totals. Parameters a stage chooses from calibration data at prune time are not in
    the per-layer table; the totals count them (each removed linear weight is 2 FLOPs per token) and say
    so, rather than show the data-dependent stages as removing nothing."""
    lines = []
    for k, extra in (
        ("params", pending),
        ("decoder_linear_params", pending),
        ("flops_per_token", 2 * pending),
    ):
        after = p[k] - extra
        mark = "~" if pending and k == "flops_per_token" else " "
        lines.append(f"{k:<22} {d[k]:>14,} ->{mark}{after:>14,}  ({1 - after / d[k]:.1%} removed)")
    if pending:
        lines.append(
            f"  the per-layer table shows the planned stages only; {pending:,} parameters are chosen from "
            "calibration data at prune time (the report lists where they went)"
        )
    return lines


def format_explanation(ex: Explanation) -> str:
    """The plan as a table people can review."""
    lines = [f"{'layer':>5} {'mlp':>11} {'q heads':>9} {'kv heads':>9} {'v dim':>9} {'skip':>10}"]
    for r in ex.rows:
        a, b = r["dense"], r["pruned"]
        skip = ",".join(n for n, f in (("attn", b["skip_attention"]), ("mlp", b["skip_mlp"])) if f) or "-"
        lines.append(
            f"{r['layer']:>5} {b['intermediate_size']:>5}/{a['intermediate_size']:<5} "
            f"{b['num_heads']:>4}/{a['num_heads']:<4} {b['num_kv_heads']:>4}/{a['num_kv_heads']:<4} "
            f"{b['v_head_dim']:>4}/{a['v_head_dim']:<4} {skip:>10}"
        )
    d, p = ex.totals["dense"], ex.totals["pruned"]
    lines.append("")
    for n, st in enumerate(ex.stages, 1):
        note = f" ({st['note']})" if "note" in st else ""
        note += f"; {st['options']}" if "options" in st else ""
        lines.append(f"stage {n}: {st['method']} removes {st['params_to_remove']:,} parameters{note}")
        if "heal" in st:
            lines.append(f"  {st['heal']}")
    lines += total_lines(d, p, sum(st["params_to_remove"] for st in ex.stages if "note" in st))
    lines += [f"export {line}" for line in ex.exports]
    lines += ex.serving
    if ex.latency is not None:
        lat = ex.latency
        lines.append(f"predicted latency on {lat['target']} (ms, dense -> planned):")
        for i, row in enumerate(lat["layers"]):
            cells = "  ".join(f"{p} {a * 1e3:7.2f} -> {b * 1e3:7.2f}" for p, (a, b) in row.items())
            lines.append(f"  layer {i:>3}  {cells}")
        for p in PHASES:
            d, q = lat["dense"][p], lat["pruned"][p]
            lines.append(f"  whole model {p}: {d * 1e3:.1f} -> {q * 1e3:.1f} ms ({q / d:.3f} of dense)")
    if ex.stream is not None:
        gib = {k: v / 2**30 for k, v in ex.stream.items()}
        held = " (read in place from the file: the calibration tokens' rows)" if ex.stream_mapped else ""
        lines.append(
            f"streaming: one decoder layer in memory at a time, written shard by shard (one or more shards "
            f"per layer, each at most output.max_shard_size); resident about {gib['total']:.2f} GiB = "
            f"2 x layer {gib['layer_x2'] / 2:.2f} + embeddings/head {gib['resident']:.2f}{held} + activations "
            f"{gib['activations']:.2f} + statistics {gib['statistics']:.2f} + restoration workspace "
            f"{gib['solve']:.2f} + after the pass {gib['after_pass']:.2f} + runtime allowance "
            f"{gib['runtime']:.2f} (report.json records it beside the measured peak RSS)"
        )
    return "\n".join(lines)
