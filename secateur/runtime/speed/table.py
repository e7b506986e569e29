"""The dense-vs-pruned speed table: speedups, FLOPs ratios, the realised share of the FLOPs
ratio and whether the measured spread supports each speedup; and its few printed lines."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from secateur.graph.count import served_flops
from secateur.runtime.measure.timing import SPREAD_LIMIT
from secateur.runtime.speed.measure import Timing
from secateur.runtime.store.loader import LoadedModel


def speed_table(
    dense: LoadedModel,
    pruned: LoadedModel,
    t: dict[str, Timing],
    engine: str,
    version: str,
    threads: int,
    prefill: int,
    decode: int,
    outtype: str,
    rounds: int,
) -> dict[str, Any]:
    """Speedups, FLOPs ratios, realised shares and whether the spread supports them."""
    fd = served_flops(dense.model, dense.adapter, prefill, decode)
    fp = served_flops(pruned.model, pruned.adapter, prefill, decode)
    phases: dict[str, Any] = {}
    for j, ph in enumerate(("prefill", "decode")):
        td, tp = t["dense"].phase(ph), t["pruned"].phase(ph)
        sd, sp = getattr(t["dense"], f"{ph}_spread") or 0.0, getattr(t["pruned"], f"{ph}_spread") or 0.0
        n = prefill if ph == "prefill" else decode
        speedup, flops_ratio = td / tp, fd[j] / fp[j]
        noise = (sd**2 + sp**2) ** 0.5
        phases[ph] = {
            "dense_tok_s": n / td,
            "pruned_tok_s": n / tp,
            "speedup": speedup,
            "flops_ratio": flops_ratio,
            "realised": (speedup - 1) / (flops_ratio - 1) if flops_ratio > 1.0001 else None,
            "spread": noise,
            "supported": noise <= SPREAD_LIMIT and abs(speedup - 1) > noise,
        }
    return {
        "engine": engine,
        "version": version,
        "weights": outtype if engine == "llama.cpp" else str(dense.dtype).replace("torch.", ""),
        "threads": threads,
        "prefill_len": prefill,
        "decode_tokens": decode,
        "rounds": rounds,
        "busy": t["dense"].busy or t["pruned"].busy,
        "phases": phases,
        "timings": {k: asdict(v) for k, v in t.items()},
    }


def format_speed(table: dict[str, Any]) -> str:
    """A few lines: per phase, dense and pruned tokens/s, speedup, FLOPs ratio, realised, spread."""
    head = (
        f"{table['engine']} ({table['version']}, {table['weights']}, {table['threads']} threads): "
        f"prefill {table['prefill_len']} tokens, {table['decode_tokens']} decode steps, medians of "
        f"{table['rounds']} alternating rounds"
    )
    lines = [head]
    for ph, r in table["phases"].items():
        real = "n/a" if r["realised"] is None else f"{r['realised']:.2f}"
        verdict = "" if r["supported"] else "  (within the timing spread: not a measured difference)"
        lines.append(
            f"  {ph:7s} dense {r['dense_tok_s']:8.1f} tok/s  pruned {r['pruned_tok_s']:8.1f} tok/s  "
            f"{r['speedup']:.2f}x (FLOPs {r['flops_ratio']:.2f}x, realised {real}, spread +-{r['spread']:.0%}){verdict}"
        )
    if table["busy"]:
        lines.append(
            f"  the machine was busy: spreads stayed above {SPREAD_LIMIT:.0%} after three attempts; "
            "re-run on a quiet machine before trusting these figures"
        )
    return "\n".join(lines)
