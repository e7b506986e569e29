"""Benchmark: searched vs uniform allocation on SmolLM2-135M (FASP, restoration), 20% and 30%.

Not a test. For each ratio: build the search cache once, run N trials (KL to the dense model on
held-out calibration tokens), compile the best and the uniform plan with the sequential FASP
pass, and evaluate WikiText-2 test perplexity at seqlen 2048 (fixed prefix). Also reports
search wall time, seconds per trial and a trial's cost relative to one proxy forward pass.
Writes bench/results/search.md (+ .json) after each ratio.

    python bench/search_bench.py --ratios 0.2 0.3 --trials 100
    python bench/search_bench.py --model gemma3-270m --ratios 0.2 --trials 30 --out bench/results/search-gemma3-270m
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _results import machine, write_results

from secateur.graph.count import decoder_linear_params
from secateur.recipe.compile import BudgetSpec, uniform_plan
from secateur.recipe.schema import SearchOptions
from secateur.runtime.data import calibration_windows, eval_windows, load_text, tokenize_text
from secateur.runtime.evaluate import perplexity
from secateur.runtime.loader import load_model
from secateur.runtime.sequential import prune_sequential
from secateur.runtime.timing import sync
from secateur.search.cache import search_windows
from secateur.search.plots import write_plots
from secateur.search.study import run_search


@torch.inference_mode()
def proxy_forward_seconds(model: torch.nn.Module, heldout: torch.Tensor, batch: int = 4) -> float:
    """One dense forward over the held-out windows: the unit a trial's cost is compared with."""
    dev = next(model.parameters()).device
    t = time.perf_counter()
    for s in range(0, heldout.shape[0], batch):
        model(input_ids=heldout[s : s + batch].to(dev), use_cache=False)
    sync(dev)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--n-samples", type=int, default=32, help="calibration windows for the search statistics")
    ap.add_argument("--compile-samples", type=int, default=128, help="calibration windows to compile plans")
    ap.add_argument("--heldout-tokens", type=int, default=2048)
    ap.add_argument("--windows-2048", type=int, default=8)
    ap.add_argument("--min-keep", type=float, default=0.2)
    ap.add_argument(
        "--knots", type=int, default=0, help="0: a keep fraction per layer; N: N knots over depth"
    )
    ap.add_argument("--append", action="store_true", help="keep --out's rows of other (ratio, knots) pairs")
    ap.add_argument(
        "--uniform-from",
        default=None,
        help="bench/results/fasp.json of a run with the same calibration and test windows: take the "
        "uniform rows' perplexity from it instead of compiling uniform again",
    )
    ap.add_argument("--model", default="smollm2-135m", help="model reference (short name, folder, .gguf)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (float32 on every device)")
    ap.add_argument("--out", default="bench/results/search")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(args.model, dtype="float32", device=args.device)
    val = tokenize_text(lm.tokenizer, load_text("wikitext2", "validation"))
    test = eval_windows(tokenize_text(lm.tokenizer, load_text("wikitext2", "test")), 2048, args.windows_2048)
    calib, heldout = search_windows(val, args.n_samples, 512, args.heldout_tokens, 256, 0)
    compile_calib = calibration_windows(val, args.compile_samples, 512, 0)
    layers = list(range(lm.adapter.num_layers))
    dense_ppl = perplexity(lm.model, test)
    fwd = proxy_forward_seconds(lm.model, heldout)
    out_json = Path(args.out).with_suffix(".json")
    rows = json.loads(out_json.read_text())["rows"] if args.append and out_json.is_file() else []
    for ratio in args.ratios:
        spec = BudgetSpec(fraction=ratio, multiple_of=8, min_keep=args.min_keep)
        t = time.perf_counter()
        res = run_search(
            lm.model,
            lm.adapter,
            calib,
            heldout,
            spec,
            layers,
            SearchOptions(
                trials=args.trials, heldout_tokens=args.heldout_tokens, pruner=True, knots=args.knots
            ),
            storage=None,
            n_trials=args.trials,
            progress=True,
        )
        search_s = time.perf_counter() - t
        per_trial = [r["seconds"] for r in res.trials_table if r["state"] == "COMPLETE" and r["seconds"]]
        n_pruned = sum(r["state"] == "PRUNED" for r in res.trials_table)
        row = {
            "command": "python " + " ".join(sys.argv),
            "knots": args.knots,
            "ratio": ratio,
            "trials": len(res.trials_table),
            "search_s": search_s,
            "s_per_trial_median": sorted(per_trial)[len(per_trial) // 2] if per_trial else None,
            "s_per_trial_all": search_s / max(len(res.trials_table), 1),
            "pruned_trials": n_pruned,
            "proxy_forward_s": fwd,
            "best_kl": res.best_value,
            "uniform_kl": res.uniform_value,
        }
        write_plots(res, Path(args.out).parent / plot_dir(ratio, args.knots, args.model))
        plans = [("uniform", uniform_plan(lm.model, lm.adapter, spec, layers)), ("searched", res.best_plan)]
        known = uniform_rows(args.uniform_from, ratio, args) if args.uniform_from else None
        if known is not None:
            row["uniform_ppl_2048"], row["uniform_decoder_params"] = known
            row["uniform_from"] = args.uniform_from
            plans = plans[1:]
        for name, plan in plans:
            m = copy.deepcopy(lm.model)
            prune_sequential(m, lm.adapter, compile_calib, plan, progress=False)
            row[f"{name}_ppl_2048"] = perplexity(m, test)
            row[f"{name}_decoder_params"] = decoder_linear_params(m, lm.adapter)
            del m
        rows = [r for r in rows if (r["ratio"], r.get("knots", 0)) != (ratio, args.knots)] + [row]
        print(json.dumps(row), flush=True)
        write(args, rows, dense_ppl)


def plot_dir(ratio: float, knots: int, model: str = "smollm2-135m") -> str:
    prefix = "" if model == "smollm2-135m" else f"{Path(model).name}-"
    return f"{prefix}search-{round(ratio * 100)}" + (f"-knots{knots}" if knots else "")


def uniform_rows(path: str, ratio: float, args: argparse.Namespace) -> tuple[float, int] | None:
    """The FASP bench's uniform FASP + restore row at `ratio`, when it used the same windows."""
    for r in json.loads(Path(path).read_text()):
        same = r.get("n_samples", args.compile_samples) == args.compile_samples
        if r["variant"] == "FASP + restore" and abs(r["ratio"] - ratio) < 1e-9 and same:
            return r["ppl_2048"], r["decoder_linear_params"]
    return None


def space_name(row: dict) -> str:
    return f"{row['knots']} knots over depth" if row.get("knots") else "per layer"


def write(args: argparse.Namespace, rows: list[dict], dense_ppl: float) -> None:
    lines = [
        f"# Searched vs uniform allocation, {args.model}, FASP + restoration",
        "",
        "Commands (each row's own is in the .json):  ",
        *[f"`{c}`  " for c in dict.fromkeys(r.get("command", "python " + " ".join(sys.argv)) for r in rows)],
        f"Machine: {machine()}; fp32 on {args.device}  ",
        f"Search: MLP keep fraction per layer, TPE seeded with uniform and CFSP-angular allocations, "
        f"{args.n_samples} x 512 calibration tokens for statistics, KL to the dense model on "
        f"{args.heldout_tokens} held-out tokens (disjoint), min_keep {args.min_keep}. Compile: sequential FASP "
        f"with {args.compile_samples} x 512 calibration tokens. Perplexity: WikiText-2 test, first "
        f"{args.windows_2048} windows of 2048 tokens (dense: {dense_ppl:.2f}). Proxy forward: one dense forward "
        f"over the held-out tokens ({rows[0]['proxy_forward_s']:.1f} s)."
        + (
            f" Uniform rows from {args.uniform_from} (same calibration and test windows)."
            if args.uniform_from
            else ""
        ),
        "",
        "| removed | space | trials (pruned early) | search s | s/trial, all incl. cache | s/complete trial (median) "
        "| complete trial / proxy fwd | KL uniform | KL best | ppl uniform | ppl searched | ppl gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        spt = r["s_per_trial_median"]
        lines.append(
            f"| {r['ratio']:.0%} | {space_name(r)} | {r['trials']} ({r['pruned_trials']}) | {r['search_s']:.0f} | "
            f"{r['s_per_trial_all']:.1f} | {spt:.1f} | {spt / r['proxy_forward_s']:.2f} | "
            f"{r['uniform_kl']:.4f} | {r['best_kl']:.4f} | {r['uniform_ppl_2048']:.2f} | {r['searched_ppl_2048']:.2f} | "
            f"{1 - r['searched_ppl_2048'] / r['uniform_ppl_2048']:.1%} |"
        )
    for r in rows:
        pct, d = round(r["ratio"] * 100), plot_dir(r["ratio"], r.get("knots", 0), args.model)
        lines += [
            "",
            f"{pct}%, {space_name(r)}: best trial's per-layer allocation vs uniform, and the optimization history:",
            "",
            f"![allocation {pct}%]({d}/allocation.png) ![history {pct}%]({d}/history.png)",
        ]
    write_results(args.out, {"dense_ppl_2048": dense_ppl, "rows": rows}, lines)


if __name__ == "__main__":
    main()
