"""Run reports people can read: report.json (the data as-is), report.md and a widths chart.

Every section of report.md is optional and written only when its key is in the report, so the
same writer serves a full prune-and-evaluate run and a bare prune. The chart is drawn on a
standalone Agg figure (no pyplot), leaving the caller's matplotlib state alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateur.runtime.heal.plot import HEAL_PNG, plot_heal
from secateur.runtime.measure.timing import memory_lines
from secateur.runtime.speed.table import format_speed

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
WIDTHS_PNG = "widths.png"

_SIZE_LABELS = {
    "params": "parameters",
    "decoder_linear_params": "decoder linear params",
    "flops_per_token": "FLOPs/token",
}
_SPEED_LABELS = {
    "prefill_tok_s": "prefill tokens/s",
    "decode_tok_s": "decode tokens/s",
    "prefill_s_median": "prefill s (median)",
    "prefill_spread": "prefill spread (IQR/median)",
    "decode_spread": "decode spread (IQR/median)",
    "decode_s_median": "decode s (median)",
    "weights_bytes": "weights MiB",
    "peak_mem_bytes": "peak memory MiB",
}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not _num(v):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:{spec}}" if math.isfinite(v) else str(v)


def _ratio(new: Any, base: Any) -> str:
    return f"{new / base:.3f}x" if _num(new) and _num(base) and base else "—"


def _table(header: list[str], rows: list[list[str]], text_cols: int = 0) -> list[str]:
    """A markdown table: the first column and the last `text_cols` left-aligned, numbers right."""
    n = len(header)
    align = ["---" if i == 0 or i >= n - text_cols else "---:" for i in range(n)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _compare(
    dense: dict[str, Any],
    pruned: dict[str, Any],
    labels: dict[str, str] | None = None,
    fmt: Callable[[Any], str] = _fmt,
) -> list[list[str]]:
    """One row per key of either side: dense, pruned and pruned/dense."""
    keys = list(dict.fromkeys([*dense, *pruned]))
    return [
        [(labels or {}).get(k, k), fmt(dense.get(k)), fmt(pruned.get(k)), _ratio(pruned.get(k), dense.get(k))]
        for k in keys
    ]


def _recipe(report: dict[str, Any]) -> list[str]:
    return ["## Recipe", "", "```yaml", str(report["recipe_yaml"]).rstrip("\n"), "```"]


def _size(report: dict[str, Any]) -> list[str]:
    s = report["size"]
    rows = _compare(s.get("dense", {}), s.get("pruned", {}), _SIZE_LABELS)
    return ["## Size", "", *_table(["", "dense", "pruned", "ratio"], rows)]


def _kept(new: Any, base: Any) -> str:
    if not _num(base) or not base:
        return _fmt(new)
    return f"{_fmt(new)}/{_fmt(base)} ({new / base:.2f})"


def _layers(report: dict[str, Any], chart: bool) -> list[str]:
    dense = report.get("dense_layer") or {}
    rows = []
    for i, lay in enumerate(report["layers"]):
        rows.append(
            [
                str(lay.get("layer", i)),
                _kept(lay.get("num_heads"), dense.get("num_heads")),
                _kept(lay.get("num_kv_heads"), dense.get("num_kv_heads")),
                _kept(lay.get("intermediate_size"), dense.get("intermediate_size")),
                "removed" if lay.get("skip_attention") else "kept",
                "removed" if lay.get("skip_mlp") else "kept",
            ]
        )
    out = ["## Per-layer widths", ""]
    if dense:
        out += [
            f"Dense layer: {_fmt(dense.get('num_heads'))} query heads, {_fmt(dense.get('num_kv_heads'))} "
            f"KV heads, {_fmt(dense.get('intermediate_size'))} MLP channels.",
            "",
        ]
    if chart:
        out += [f"![kept fraction of MLP channels and query heads per layer]({WIDTHS_PNG})", ""]
    header = ["layer", "query heads", "KV heads", "MLP channels", "attention", "MLP"]
    return out + _table(header, rows, text_cols=2)


def _perplexity(ppl: dict[str, Any]) -> list[str]:
    rows = _compare(ppl.get("dense", {}), ppl.get("pruned", {}), fmt=lambda v: _fmt(v, ".2f"))
    return ["### Perplexity", "", *_table(["set", "dense", "pruned", "ratio"], rows)]


def _delta(new: Any, base: Any) -> str:
    return f"{new - base:+.4f}" if _num(new) and _num(base) else "—"


def _zeroshot(zs: dict[str, Any]) -> list[str]:
    dense, pruned = zs.get("dense", {}), zs.get("pruned", {})
    tasks = [t for t in dict.fromkeys([*dense, *pruned]) if t != "mean"]
    if "mean" in dense or "mean" in pruned:
        tasks.append("mean")
    rows = []
    for t in tasks:
        d, p = dense.get(t, {}), pruned.get(t, {})
        row = [f"**{t}**" if t == "mean" else t]
        for m in ("acc", "acc_norm"):
            row += [_acc(d, m), _acc(p, m), _delta(p.get(m), d.get(m))]
        rows.append(row)
    header = ["task", "dense acc", "pruned acc", "Δ acc", "dense acc_norm", "pruned acc_norm", "Δ acc_norm"]
    return [
        "### Zero-shot accuracy",
        "",
        "lm-eval, 0-shot; ± is lm-eval's standard error of the mean.",
        "",
        *_table(header, rows),
    ]


def _acc(row: dict[str, Any], m: str) -> str:
    """An accuracy with lm-eval's standard error beside it."""
    err = row.get(f"{m}_stderr")
    return _fmt(row.get(m), ".4f") + (f" ± {err:.4f}" if _num(err) else "")


def _quality(report: dict[str, Any]) -> list[str]:
    out = ["## Quality"]
    if "perplexity" in report:
        out += ["", *_perplexity(report["perplexity"])]
    if report.get("zeroshot"):
        out += ["", *_zeroshot(report["zeroshot"])]
    return out


def _speed_value(key: str, v: Any) -> str:
    if key.endswith("_bytes") and _num(v):
        return f"{v / 2**20:,.1f}"
    if key.endswith("_tok_s") and _num(v):
        return f"{v:,.1f}"
    return _fmt(v)


def _speed(report: dict[str, Any]) -> list[str]:
    sp = report["speed"]
    dense = {k: v for k, v in sp.get("dense", {}).items() if k != "device"}
    pruned = {k: v for k, v in sp.get("pruned", {}).items() if k != "device"}
    keys = list(dict.fromkeys([*dense, *pruned]))
    rows = [
        [
            _SPEED_LABELS.get(k, k),
            _speed_value(k, dense.get(k)),
            _speed_value(k, pruned.get(k)),
            _ratio(pruned.get(k), dense.get(k)),
        ]
        for k in keys
    ]
    out = ["## Speed", ""]
    if sp.get("device"):
        out += [f"Measured on `{sp['device']}`, dense and pruned alternately.", ""]
    out += _table(["", "dense", "pruned", "ratio"], rows)
    if sp.get("ratios"):
        out += ["", *(f"- {k}: {_fmt(v, '.3f')}x" for k, v in sp["ratios"].items())]
    if sp.get("warnings"):
        out += ["", *(f"> **Warning:** {w}" for w in sp["warnings"])]
    return out


def _serving(report: dict[str, Any]) -> list[str]:
    """The serving target, the width step and speed goal it resolved, and the engine's measured speed."""
    out = ["## Speed where it is served", ""]
    sv = report.get("serving") or {}
    if sv.get("target"):
        out.append(f"- target: {sv['target']}")
    if sv.get("width_step"):
        out.append(f"- width step: {sv['width_step']}")
    if sv.get("goal") is not None:
        pred = ", ".join(f"{p} {v:.3f}" for p, v in sv.get("predicted", {}).items())
        out.append(f"- latency goal: {sv['goal']:.3f} of dense ({sv['phase']}), predicted {pred}")
    es = report.get("engine_speed")
    if es:
        out += ["", "```", format_speed(es), "```"]
        goal = sv.get("goal")
        if goal is not None:
            phases = ("prefill", "decode") if sv.get("phase") == "both" else (sv.get("phase"),)
            got = {p: 1 / es["phases"][p]["speedup"] for p in phases}
            met = all(v <= goal * 1.05 for v in got.values())
            shown = ", ".join(f"{p} {v:.3f}" for p, v in got.items())
            out.append(
                f"Latency goal {goal:.3f}: measured {shown} of dense: {'met' if met else 'missed'} (5% tolerance)."
            )
    elif report.get("engine_speed_skipped"):
        out += ["", f"> {report['engine_speed_skipped']}"]
    return out


def _healing(report: dict[str, Any], chart: bool = False) -> list[str]:
    """Each heal: data, tokens, time, and quality before it against the final quality."""
    out = ["## Healing (distillation from the dense model)", ""]
    final = (report.get("perplexity") or {}).get("pruned", {})
    for h in report["heal"]:
        d = h["data"]
        out.append(
            f"- after stage {h['after_stage']}: {h['tokens']:,} tokens of {d['source']} (data sha256 "
            f"`{d['fingerprint'][:12]}`), {h['steps']} steps, {h['seconds']:.0f} s ({h['tokens_per_s']:,.0f} "
            f"tokens/s, {h['precision']}), {h['trainable_params']:,} trainable parameters"
            + (f", resumed from step {h['resumed_from']}" if h.get("resumed_from") else "")
        )
        before = (h.get("before") or {}).get("perplexity") or {}
        rows = [
            [k, _fmt(v, ".3f"), _fmt(final.get(k), ".3f"), _delta(final.get(k), v)] for k, v in before.items()
        ]
        if rows:
            out += ["", *_table(["perplexity", "before healing", "after (final)", "change"], rows, 1), ""]
    zs = (report["heal"][-1].get("before") or {}).get("zeroshot")
    if zs and (report.get("zeroshot") or {}).get("pruned"):
        out += ["Zero-shot before the last heal vs the final model:", ""]
        out += _zeroshot({"dense": zs, "pruned": report["zeroshot"]["pruned"]})
    if chart:
        out += ["", f"![heal loss]({HEAL_PNG})"]
    return out


def _timing(report: dict[str, Any]) -> list[str]:
    phases = report["phases"]
    rows = [[k, _fmt(v, ".2f")] for k, v in phases.items()]
    total = sum(v for v in phases.values() if _num(v))
    rows.append(["**total**", f"{total:.2f}"])
    out = ["## Timing", "", *_table(["phase", "seconds"], rows)]
    lines = memory_lines(report.get("memory") or {})
    bound = (report.get("stream") or {}).get("memory_bound_bytes")
    if bound:
        g = {k: v / 2**30 for k, v in bound.items()}
        lines += [
            "",
            f"Streamed: one decoder layer in memory at a time. Expected resident memory {g['total']:.2f} GiB = "
            f"2 x largest layer {g['layer_x2']:.2f} + embeddings/norm/head {g['resident']:.2f} + calibration "
            f"activations {g['activations']:.2f} + Gram matrices {g['statistics']:.2f} + restoration workspace "
            f"{g.get('solve', 0):.2f} + runtime allowance {g.get('runtime', 0):.2f}",
        ]
    return out + ([""] + lines if lines else [])


def result_sections(report: dict[str, Any]) -> list[str]:
    """Size, quality and speed sections of a report as markdown (also used by the model card)."""
    return ["\n".join(p) for p in _results(report)]


def _results(report: dict[str, Any], chart: bool | None = None, heal_chart: bool = False) -> list[list[str]]:
    """The sections of what a run measured, in report order: size, the per-layer table (only when
    `chart` is given: whether widths.png was written), quality, speed, serving, healing."""
    parts = []
    if "size" in report:
        parts.append(_size(report))
    if chart is not None and report.get("layers"):
        parts.append(_layers(report, chart))
    if "perplexity" in report or report.get("zeroshot"):
        parts.append(_quality(report))
    if "speed" in report:
        parts.append(_speed(report))
    if report.get("serving") or report.get("engine_speed"):
        parts.append(_serving(report))
    if report.get("heal"):
        parts.append(_healing(report, heal_chart))
    return parts


def render_markdown(report: dict[str, Any], chart: bool = False, heal_chart: bool = False) -> str:
    """report.md text; `chart` / `heal_chart`: whether widths.png / heal.png were written next to it."""
    parts: list[list[str]] = [["# Secateur report"]]
    labels = {"device": "device", "dtype": "dtype", "output_dtype": "saved as"}
    run = [f"{label}: `{report[k]}`" for k, label in labels.items() if report.get(k)]
    if run:
        parts.append([", ".join(run)])
    if "recipe_yaml" in report:
        parts.append(_recipe(report))
    parts += _results(report, chart, heal_chart)
    if "phases" in report:
        parts.append(_timing(report))
    if "lock_fingerprint" in report:
        parts.append(["## Lock fingerprint", "", f"`{report['lock_fingerprint']}`"])
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def _fraction(lay: dict[str, Any], dense: dict[str, Any], key: str, skip: str) -> float:
    base = dense.get(key)
    if lay.get(skip) or not _num(base) or not base:
        return 0.0
    return float(lay.get(key) or 0) / float(base)


def plot_widths(path: Path, layers: list[dict[str, Any]], dense: dict[str, Any]) -> bool:
    """Bar chart of the kept fraction of MLP channels and query heads per layer (False when
    matplotlib is missing, so reports still work without the `plot` extra)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    idx = [int(lay.get("layer", i)) for i, lay in enumerate(layers)]
    mlp = [_fraction(lay, dense, "intermediate_size", "skip_mlp") for lay in layers]
    heads = [_fraction(lay, dense, "num_heads", "skip_attention") for lay in layers]
    fig = Figure(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    w = 0.4
    ax.bar([i - w / 2 for i in idx], mlp, width=w, label="MLP channels")
    ax.bar([i + w / 2 for i in idx], heads, width=w, label="query heads")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("layer")
    ax.set_ylabel("kept fraction of dense")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(idx)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return True


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write report.json, report.md and (with per-layer widths and dense shapes) widths.png."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT_JSON).write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    chart = False
    if report.get("layers") and report.get("dense_layer"):
        chart = plot_widths(folder / WIDTHS_PNG, report["layers"], report["dense_layer"])
    heal_chart = bool(report.get("heal")) and plot_heal(folder / HEAL_PNG, report["heal"])
    (folder / REPORT_MD).write_text(render_markdown(report, chart, heal_chart), encoding="utf-8")


def read_report(folder: str | Path) -> str:
    """report.md of an output folder (what `secateur report DIR` prints)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"report: {folder} is not a directory")
    path = folder / REPORT_MD
    if not path.is_file():
        raise FileNotFoundError(f"report: {folder} has no {REPORT_MD} (not a secateur output folder?)")
    return path.read_text(encoding="utf-8")
