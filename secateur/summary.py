"""The dense-vs-pruned table `secateur prune` prints from a run's report (sizes, perplexity, speed)."""

from __future__ import annotations

from typing import Any

from secateur.runtime.speed.table import format_speed


def format_summary(report: dict[str, Any]) -> str:
    """Dense vs pruned: parameters, perplexity, speed."""
    d, p = report["size"]["dense"], report["size"]["pruned"]
    rows = [
        ("parameters", f"{d['params']:,}", f"{p['params']:,}", f"{p['params'] / d['params']:.3f}x"),
        (
            "decoder linear params",
            f"{d['decoder_linear_params']:,}",
            f"{p['decoder_linear_params']:,}",
            f"{p['decoder_linear_params'] / d['decoder_linear_params']:.3f}x",
        ),
        (
            f"FLOPs/token (ctx {report.get('flops_context', 512)})",
            f"{d['flops_per_token']:,}",
            f"{p['flops_per_token']:,}",
            f"{p['flops_per_token'] / d['flops_per_token']:.3f}x",
        ),
    ]
    for k, v in report.get("perplexity", {}).get("dense", {}).items():
        pv = report["perplexity"]["pruned"][k]
        rows.append((f"perplexity {k}", f"{v:.2f}", f"{pv:.2f}", f"{pv / v:.3f}x"))
    sp = report.get("speed")
    if sp:
        for key, label in (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s")):
            rows.append(
                (
                    label,
                    f"{sp['dense'][key]:.1f}",
                    f"{sp['pruned'][key]:.1f}",
                    f"{sp['pruned'][key] / sp['dense'][key]:.2f}x",
                )
            )
    w = max(len(r[0]) for r in rows)
    lines = [f"{'':<{w}}  {'dense':>16}  {'pruned':>16}  {'ratio':>8}"]
    lines += [f"{a:<{w}}  {b:>16}  {c:>16}  {r:>8}" for a, b, c, r in rows]
    if sp:
        n = sp["pruned"].get("repeats", "?")
        spreads = [
            f"{ph} +-{sp[m][f'{ph}_spread']:.0%} ({m})"
            for ph in ("prefill", "decode")
            for m in ("dense", "pruned")
            if sp[m].get(f"{ph}_spread") is not None
        ]
        lines.append(
            f"speed: medians of {n} alternating repeats"
            + (f"; spread {', '.join(spreads)}" if spreads else "")
        )
        lines += [f"warning: {w}" for w in sp.get("warnings", [])]
    if report.get("engine_speed"):
        lines.append(format_speed(report["engine_speed"]))
    elif report.get("engine_speed_skipped"):
        lines.append(report["engine_speed_skipped"])
    return "\n".join(lines)
