"""Benchmark: which sampler gives the better Pareto front for `objectives: [kl, params]`.

Not a test. A quick measurement behind the default of Pareto mode (issue 27): NSGA-II, TPE
(multi-objective) and random search, each for `--trials` trials from the same seeds (uniform and
CFSP at three budgets), on a tiny random Llama (`--model tiny`, seconds) or SmolLM2-135M; the
quality of a front is its hypervolume against the reference point (worst KL seen, all parameters
kept), higher is better, averaged over `--seeds` sampler seeds.

    python bench/pareto_sampler_bench.py --trials 60 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import torch
from _results import machine, write_results

from secateur.graph.adapters import adapter_for
from secateur.recipe.allocation import SearchOptions
from secateur.recipe.compile import BudgetSpec
from secateur.search.run import run_search
from secateur.testing import tiny_model


def hypervolume(points: list[tuple[float, float]], ref: tuple[float, float]) -> float:
    """Area dominated by a 2-D minimisation front up to `ref`."""
    area, best_y = 0.0, ref[1]
    for x, y in sorted(p for p in points if p[0] <= ref[0] and p[1] <= ref[1]):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samplers", nargs="+", default=["nsga2", "tpe", "random"])
    ap.add_argument("--out", default="bench/results/pareto-samplers")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = tiny_model("llama", num_hidden_layers=8, intermediate_size=192)
    adapter = adapter_for(model.config)
    g = torch.Generator().manual_seed(0)
    calib, held = torch.randint(0, 128, (16, 64), generator=g), torch.randint(0, 128, (16, 64), generator=g)
    spec = BudgetSpec(fraction=0.3, attention="kv_group", multiple_of=8)
    tmp = tempfile.mkdtemp(prefix="pareto-bench-")
    runs: dict[str, list[list[tuple[float, float]]]] = {}
    secs: dict[str, list[float]] = {}
    for sampler in args.samplers:
        for seed in range(args.seeds):
            opts = SearchOptions(
                trials=args.trials, seed=seed, levels=9, objectives=["kl", "params"], sampler=sampler
            )
            t = time.perf_counter()
            res = run_search(
                model,
                adapter,
                calib,
                held,
                spec,
                list(range(8)),
                opts,
                progress=False,
                cache_kwargs={"variants_dir": tmp},
            )
            secs.setdefault(sampler, []).append(time.perf_counter() - t)
            runs.setdefault(sampler, []).append([(p["kl"], p["params"]) for p in res.front])
    worst = max(kl for fronts in runs.values() for f in fronts for kl, _ in f)
    ref = (worst, 1.0)
    rows = []
    for sampler, fronts in runs.items():
        hv = [hypervolume([(c, k) for k, c in f], (ref[1], ref[0])) for f in fronts]
        rows.append(
            {
                "sampler": sampler,
                "hypervolume_mean": statistics.mean(hv),
                "hypervolume_min": min(hv),
                "hypervolume_max": max(hv),
                "front_points": statistics.mean(len(f) for f in fronts),
                "seconds": statistics.mean(secs[sampler]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    lines = [
        "# Pareto mode: which sampler (tiny random Llama, objectives [kl, params])",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}, one thread. Model: tiny random Llama, 8 layers, hidden 64, MLP 192, 4 KV "
        f"groups... as `secateur.testing.tiny_model`; 9 keep levels per MLP and KV-group slot; {args.trials} "
        f"trials per run (6 of them the uniform and CFSP seeds at 0.5x/1x/1.5x of 30%), {args.seeds} seeds "
        "per sampler. Hypervolume of the front (params kept x held-out KL) up to (1.0, worst KL seen): "
        "higher is better.",
        "",
        "| sampler | hypervolume mean | min | max | front points | s per run |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -r["hypervolume_mean"]):
        lines.append(
            f"| {r['sampler']} | {r['hypervolume_mean']:.5f} | {r['hypervolume_min']:.5f} | "
            f"{r['hypervolume_max']:.5f} | {r['front_points']:.1f} | {r['seconds']:.1f} |"
        )
    write_results(args.out, {"rows": rows, "ref": ref}, lines)


if __name__ == "__main__":
    main()
