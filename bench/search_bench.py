"""Benchmark: searched vs uniform allocation on SmolLM2-135M, both stitched from the variant database.

Not a test. Reads recipes_examples/search-<pct>.yaml (= fasp-<pct>.yaml with `allocation: search`,
`compile: stitched`) for calibration, budget and targets. For each ratio: the uniform plan and one
search per sampler (`--samplers`), each winner compiled by stitching the same variants the search
scored (so its held-out KL is the compiled model's), then WikiText-2 perplexity on the full test
set at 2048 and the six-task zero-shot mean (`--limit` documents), evaluated in `--eval-dtype`.
Reports the variant database build, the search time, evaluations, held-out tokens scored, and a
candidate evaluation's cost against one dense forward over 2048 held-out tokens.

    python bench/search_bench.py --ratios 0.3 0.2 --samplers evolution tpe --trials 100
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
from quality_bench import DTYPES, evaluate

from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan
from secateur.lock import model_fingerprint
from secateur.recipe.compile import budget_spec, eligible_layers, removal_goal
from secateur.recipe.load import load_recipe
from secateur.runtime.allocation.variants import prune_stitched
from secateur.runtime.measure.timing import sync
from secateur.runtime.store.data import eval_windows, load_text, statistics_split, tokenize_text
from secateur.runtime.store.loader import load_model
from secateur.search.plots import write_plots
from secateur.search.run import run_search
from secateur.search_cmd import sequential_compiler


def keeping_compiler(compile_fn, built: dict):
    """`compile_fn` that also keeps each model it compiled, by plan (the bench evaluates them)."""

    def run(model, plan) -> None:
        key = repr(plan.to_dict())
        compile_fn(model, plan)
        built[key] = model

    return run


@torch.inference_mode()
def plot_dir(ratio: float, sampler: str, model: str, compile: str = "stitched") -> str:
    """Plot folder beside the table; other models than SmolLM2 get their name in front."""
    prefix = "" if model == "smollm2-135m" else f"{Path(model).name}-"
    suffix = "" if compile == "stitched" else f"-{compile}"
    return f"{prefix}search-{round(ratio * 100)}-{sampler}{suffix}"


def proxy_forward_seconds(model: torch.nn.Module, heldout: torch.Tensor, batch: int = 4) -> float:
    """One dense forward over the held-out windows: the unit an evaluation's cost is compared with."""
    dev = next(model.parameters()).device
    t = time.perf_counter()
    for s in range(0, heldout.shape[0], batch):
        model(input_ids=heldout[s : s + batch].to(dev), use_cache=False)
    sync(dev)
    return time.perf_counter() - t


def compiled_eval(lm, calib, plan, test, args, built: dict | None = None) -> tuple[dict, float]:
    """Compile `plan` as the recipe compiles (seconds; a model the re-scoring already built is taken
    from `built`), then evaluate perplexity and zero-shot."""
    key = repr(plan.to_dict())
    t = time.perf_counter()
    if built and key in built:
        m = built.pop(key)
    else:
        m = copy.deepcopy(lm.model)
        if args.compile == "stitched":
            prune_stitched(m, lm.adapter, calib, plan, progress=False)
        else:
            args.compiler(m, plan)
    compile_s = time.perf_counter() - t
    ev = evaluate(m, lm.tokenizer, test, DTYPES[args.eval_dtype], None, args.limit)
    ev["decoder_linear_params"] = decoder_linear_params(m, lm.adapter)
    del m
    return ev, compile_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.2])
    ap.add_argument("--samplers", nargs="+", default=["evolution", "tpe"])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--limit", type=int, default=200, help="zero-shot documents per task")
    ap.add_argument("--eval-dtype", default="bfloat16")
    ap.add_argument("--windows-2048", type=int, default=None, help="test windows (default: all)")
    ap.add_argument("--append", action="store_true", help="keep --out's rows of other (ratio, sampler) pairs")
    ap.add_argument("--model", default="smollm2-135m", help="model reference (short name, folder, .gguf)")
    ap.add_argument(
        "--recipe-prefix", default="", help="e.g. gemma3- for recipes_examples/gemma3-search-NN.yaml"
    )
    ap.add_argument("--out", default="bench/results/search")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model(args.model, dtype="float32", device="cpu")
    test = eval_windows(tokenize_text(lm.tokenizer, load_text("wikitext2", "test")), 2048, args.windows_2048)
    fp = model_fingerprint(lm.model)
    out_json = Path(args.out).with_suffix(".json")
    old = json.loads(out_json.read_text()) if args.append and out_json.is_file() else {}
    rows = [r for r in old.get("rows", []) if "sampler" in r]
    cfg: dict = old.get("config", {})
    for ratio in args.ratios:
        recipe = load_recipe(
            f"recipes_examples/{args.recipe_prefix}search-{round(ratio * 100)}.yaml",
            [f"model={args.model}", *args.set],
        )
        args.compile = recipe.allocation.compile
        cal, opts = recipe.calibration, recipe.allocation.search
        tokens = tokenize_text(lm.tokenizer, load_text(cal.dataset, cal.split))
        calib, tail = statistics_split(tokens, cal.n_samples, cal.seqlen, cal.seed)
        heldout = eval_windows(tail, 256, opts.heldout_tokens // 256)
        layers = eligible_layers(recipe.targets, lm.adapter.num_layers, lm.adapter.layers_path)
        spec = budget_spec(recipe, count=removal_goal(recipe, lm.model, lm.adapter))
        fwd = proxy_forward_seconds(lm.model, heldout[:8])
        cfg = {
            "calibration": f"{cal.n_samples} x {cal.seqlen}",
            "heldout_tokens": int(heldout.numel()),
            "levels": opts.levels,
            "stages": opts.stages,
            "survivors": opts.survivors,
            "test_windows": int(test.shape[0]),
            "test_all": args.windows_2048 is None,
            "proxy_forward_2048_s": fwd,
        }
        uniform_done = any(_group(r) == (ratio, args.compile) and r["sampler"] == "uniform" for r in rows)
        for sampler in args.samplers:
            options = opts.model_copy(update={"sampler": sampler, "trials": args.trials})
            built: dict = {}  # the models the re-scoring compiled, by plan, evaluated below without a rebuild
            args.compiler = keeping_compiler(sequential_compiler(recipe, lm, calib), built)
            t = time.perf_counter()
            res = run_search(
                lm.model,
                lm.adapter,
                calib,
                heldout,
                spec,
                layers,
                options,
                storage=None,
                n_trials=args.trials,
                metric=recipe.importance.metric,
                restore=recipe.restore.method,
                damping=recipe.restore.damping,
                progress=True,
                cache_kwargs={"weights_fp": fp},
                compile_fn=None if args.compile == "stitched" else args.compiler,
            )
            search_s = time.perf_counter() - t
            rescore_s = sum(r["seconds"] or 0 for r in res.rescored)
            wanted = {repr(res.best_plan.to_dict())} | {
                repr(Plan.from_dict(v["plan"]).to_dict()) for v in res.seeds.values()
            }
            for key in set(built) - wanted:  # only the rows below are evaluated
                del built[key]
            trials = res.study.get_trials(deepcopy=False)
            durations = [x.duration.total_seconds() for x in trials if x.duration is not None]
            tokens = sum(int(x.last_step or 0) for x in trials)
            write_plots(res, Path(args.out).parent / plot_dir(ratio, sampler, args.model, args.compile))
            kl_key = "compiled" if res.rescored else "value"
            for seed in ("uniform", "cfsp"):
                if seed == "uniform" and uniform_done or seed not in res.seeds:
                    continue
                ev, compile_s = compiled_eval(lm, calib, Plan.from_dict(res.seeds[seed]["plan"]), test, args)
                rows = [r for r in rows if (_group(r), r["sampler"]) != ((ratio, args.compile), seed)]
                rows.append(
                    {
                        "ratio": ratio,
                        "sampler": seed,
                        "compile": args.compile,
                        "kl": res.seeds[seed][kl_key],
                        **ev,
                        "compile_s": compile_s,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            uniform_done = True
            ev, compile_s = compiled_eval(lm, calib, res.best_plan, test, args, built)
            built.clear()
            row = {
                "compile": args.compile,
                "rescore_s": rescore_s,
                "rescored": [{k: v for k, v in r.items() if k != "plan"} for r in res.rescored],
                "command": "python " + " ".join(sys.argv),
                "ratio": ratio,
                "sampler": sampler,
                "kl": res.best_value,
                "uniform_kl": res.uniform_value,
                **ev,
                "compile_s": compile_s,
                "db_build_s": (res.variants or {}).get("build_seconds"),
                "db_built": (res.variants or {}).get("built"),
                "setup_s": search_s - sum(durations),
                "search_s": search_s,
                "evaluations": len(trials),
                "pruned": sum(x.state.name == "PRUNED" for x in trials),
                "tokens_scored": tokens,
                "s_per_eval": sum(durations) / max(len(durations), 1),
                "proxy_forward_2048_s": fwd,  # measured in this row's own run
                # decoder layers the trials ran from (search/prefix.py): mean share of the layers skipped
                "prefix_skipped": sum(x.user_attrs.get("from_layer", 0) for x in trials)
                / max(len(trials), 1)
                / lm.adapter.num_layers,
                "plan": res.best_plan.to_dict(),  # the winner, to compile or to put in a recipe table
            }
            rows = [r for r in rows if (_group(r), r["sampler"]) != ((ratio, args.compile), sampler)] + [row]
            print(json.dumps(row), flush=True)
            write(args, rows, cfg)


def _group(r: dict) -> tuple:
    return (r["ratio"], r.get("compile", "stitched"))


def write(args: argparse.Namespace, rows: list[dict], cfg: dict) -> None:
    order = {"uniform": 0, "cfsp": 1}
    rows = sorted(
        rows,
        key=lambda r: (-r["ratio"], r.get("compile", "stitched"), order.get(r["sampler"], 2), r["sampler"]),
    )
    base = {(_group(r), r["sampler"]): r for r in rows if r["sampler"] in order}
    fwd = cfg["proxy_forward_2048_s"]
    lines = [
        "# Searched vs uniform and CFSP allocation, SmolLM2-135M, FASP scores + least-squares restoration",
        "",
        "Commands (each row's own is in the .json):  ",
        *[f"`{c}`  " for c in dict.fromkeys(r["command"] for r in rows if "command" in r)],
        f"Machine: {machine()}; search and compile in float32, evaluation in {args.eval_dtype}  ",
        "Recipes: recipes_examples/search-NN.yaml (= fasp-NN.yaml with `allocation: search`). "
        f"Calibration {cfg['calibration']} tokens of WikiText-2 validation (first 90%); "
        f"held-out KL on {cfg['heldout_tokens']} tokens of its last 10% (disjoint), stages {cfg['stages']} tokens "
        f"then all, {cfg['survivors']:.0%} survive each stage (rows after issue #27: a child goes on only while "
        f"it beats its parent on the same tokens); {cfg['levels']} keep levels per layer. "
        "compile `stitched`: every row (uniform, CFSP seed, winner) stitched from the one-shot variants the search "
        "scored; `sequential`: every row pruned layer by layer as `secateur prune` does, the winner chosen among the "
        "best candidates and the seeds compiled that way and re-scored (KL column: the compiled model's). "
        f"Perplexity: {'all' if cfg.get('test_all') else 'the first'} {cfg['test_windows']} windows of 2048 tokens "
        "of WikiText-2 test. Zero-shot: mean acc of "
        f"six tasks on the first {args.limit} documents each (nan: not run). Proxy forward: one dense fp32 forward "
        f"over 2048 held-out tokens (latest run: {fwd:.1f} s; each row's ratio uses its own run's).",
        "",
        "| removed | compile | allocation | ppl@2048 | vs uniform | vs CFSP | zero-shot mean | KL held-out | DB build s | "
        "search s | rescore s | evaluations (pruned) | tokens scored | s/eval | eval / proxy fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gains = []
        for name in ("uniform", "cfsp"):
            b = base.get((_group(r), name))
            gains.append(f"{r['ppl'] / b['ppl'] - 1:+.1%}" if b is not None and b is not r else "-")
        if r["sampler"] in order:
            rest = "- | - | - | - | - | - | -"
        else:
            rest = (
                f"{r['db_build_s']:.0f} ({r['db_built']} built) | {r['search_s']:.0f} | "
                f"{r.get('rescore_s', 0):.0f} | {r['evaluations']} "
                f"({r['pruned']}) | {r['tokens_scored']:,} | {r['s_per_eval']:.1f} | "
                f"{r['s_per_eval'] / r.get('proxy_forward_2048_s', fwd):.2f}"
            )
        lines.append(
            f"| {r['ratio']:.0%} | {r.get('compile', 'stitched')} | {r['sampler']} | {r['ppl']:.2f} | {gains[0]} | "
            f"{gains[1]} | {r['zeroshot_mean']:.4f} | {r['kl']:.4f} | {rest} |"
        )
    for r in rows:
        if r["sampler"] not in order:
            d = plot_dir(r["ratio"], r["sampler"], args.model, r.get("compile", "stitched"))
            lines += [
                "",
                f"{r['ratio']:.0%}, {r['sampler']}, {r.get('compile', 'stitched')}: kept fraction per layer and "
                "structure (winner vs uniform), fitness history:",
                "",
                f"![allocation]({d}/allocation.png) ![history]({d}/history.png)",
            ]
    write_results(args.out, {"config": cfg, "rows": rows}, lines)


if __name__ == "__main__":
    main()
