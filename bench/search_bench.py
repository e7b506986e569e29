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
from _results import earlier_results, machine, write_results
from quality_bench import DTYPES, evaluate

from secateur.export import tokenizer_gguf_for
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.plan import Plan
from secateur.lock import model_fingerprint
from secateur.recipe.load import load_recipe
from secateur.runtime.allocation.variant_build import prune_stitched
from secateur.runtime.measure.timing import sync
from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
from secateur.runtime.store.loader import LoadedModel
from secateur.search.plots import write_plots
from secateur.search.run import run_search
from secateur.search_cmd import search_problem, sequential_compiler
from secateur.speed import measure_pair


def keeping_compiler(compile_fn, built: dict):
    """`compile_fn` that also keeps each model it compiled, by plan (the bench evaluates them)."""

    def run(model, plan) -> None:
        key = repr(plan.to_dict())
        compile_fn(model, plan)
        built[key] = model

    return run


@torch.inference_mode()
def plot_dir(goal: str, sampler: str, model: str, compile: str = "stitched") -> str:
    """Plot folder beside the table; other models than SmolLM2 get their name in front."""
    prefix = "" if model == "smollm2-135m" else f"{Path(model).name}-"
    suffix = "" if compile == "stitched" else f"-{compile}"
    kind, value = goal.rsplit(" ", 1)
    name = (
        f"{round(float(value) * 100)}"
        if kind == "params"
        else f"{kind.split()[0]}-latency-{round(float(value) * 100)}"
    )
    return f"{prefix}search-{name}-{sampler}{suffix}"


def proxy_forward_seconds(model: torch.nn.Module, heldout: torch.Tensor, batch: int = 4) -> float:
    """One dense forward over the held-out windows given (2048 tokens: 8 of 256 or one of 2048): the unit
    an evaluation's cost is compared with."""
    dev = next(model.parameters()).device
    t = time.perf_counter()
    for s in range(0, heldout.shape[0], batch):
        model(input_ids=heldout[s : s + batch].to(dev), use_cache=False)
    sync(dev)
    return time.perf_counter() - t


def compiled_eval(
    lm, calib, plan, test, args, built: dict | None = None, tok_gguf=None
) -> tuple[dict, float]:
    """Compile `plan` as the recipe compiles (seconds; a model the re-scoring already built is taken
    from `built`), then evaluate perplexity and zero-shot, and time it against dense in llama.cpp."""
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
    ev["removed"] = 1 - ev["decoder_linear_params"] / args.dense_params
    m.float()  # evaluation may have cast it; llama.cpp gets the float32 weights as f16
    ev |= speed_row(lm, m, tok_gguf, args.speed_rounds)
    del m
    return ev, compile_s


def recipe_paths(args: argparse.Namespace) -> list[str]:
    """--ratios name recipes_examples/<prefix>search-NN.yaml; --recipes add any search recipe (latency goals)."""
    return [f"recipes_examples/{args.recipe_prefix}search-{round(r * 100)}.yaml" for r in args.ratios] + list(
        args.recipes
    )


def goal_label(recipe, removed: float) -> str:
    """The row group's budget as a user states it: a share of parameters or of dense time."""
    b = recipe.budget
    if b.latency is not None:
        return f"{b.phase} latency {b.latency:.2f}"
    return f"params {removed:.2f}"


def speed_row(dense_lm, model, tok_gguf: Path | None, rounds: int) -> dict:
    """Dense vs this compiled model in llama.cpp (f16, alternating rounds, medians and spread)."""
    if tok_gguf is None:
        return {}
    pruned = LoadedModel(
        model, adapter_for(model.config), dense_lm.tokenizer, dense_lm.source, "cpu", torch.float32
    )
    table = measure_pair(dense_lm, pruned, "llama.cpp", tok_gguf, rounds=rounds, log=print)
    return {
        "speed": {
            ph: {k: r[k] for k in ("speedup", "spread", "supported", "dense_tok_s", "pruned_tok_s")}
            for ph, r in table["phases"].items()
        },
        "speed_engine": f"{table['version']}, {table['weights']}, {table['threads']} threads, "
        f"prefill {table['prefill_len']}, decode {table['decode_tokens']}, {table['rounds']} rounds"
        + (", busy" if table["busy"] else ""),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="*", default=[])
    ap.add_argument(
        "--recipes", nargs="*", default=[], help="search recipes (e.g. latency goals) beside --ratios"
    )
    ap.add_argument("--samplers", nargs="+", default=["evolution"])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--limit", type=int, default=200, help="zero-shot documents per task")
    ap.add_argument("--eval-dtype", default="bfloat16")
    ap.add_argument("--windows-2048", type=int, default=None, help="test windows (default: all)")
    ap.add_argument(
        "--append", action="store_true", help="keep --out's rows of other (budget, sampler) pairs"
    )
    ap.add_argument("--model", default="smollm2-135m", help="model reference (short name, folder, .gguf)")
    ap.add_argument(
        "--recipe-prefix", default="", help="e.g. gemma3- for recipes_examples/gemma3-search-NN.yaml"
    )
    ap.add_argument("--speed-rounds", type=int, default=0, help="time every row in llama.cpp (0: not timed)")
    ap.add_argument("--out", default="bench/results/search")
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    old = earlier_results(args.out, args.append, {})
    rows = [r for r in old.get("rows", []) if "sampler" in r]
    cfg: dict = old.get("config", {})
    overrides = [f"model={args.model}", "model.dtype=float32", "model.device=cpu", *args.set]
    for path in recipe_paths(args):
        asked = load_recipe(path, overrides)
        p = search_problem(asked, Path(path).resolve().parent, print)
        recipe, lm = p.recipe, p.lm  # a speed goal resolved to a parameter count
        test = eval_windows(
            tokenize_text(lm.tokenizer, load_text("wikitext2", "test")), 2048, args.windows_2048
        )
        tok_gguf = tokenizer_gguf_for(lm.source, None, "speed") if args.speed_rounds else None
        fp = model_fingerprint(lm.model)
        args.compile = recipe.allocation.compile
        opts = recipe.allocation.search
        ratio = p.goal / decoder_linear_params(lm.model, lm.adapter)
        goal = goal_label(asked, ratio)
        args.dense_params = decoder_linear_params(lm.model, lm.adapter)
        fwd = proxy_forward_seconds(lm.model, p.heldout[: max(1, 2048 // p.heldout.shape[1])])
        cfg = {
            "calibration": f"{recipe.calibration.n_samples} x {recipe.calibration.seqlen}",
            "heldout_tokens": int(p.heldout.numel()),
            "levels": opts.levels,
            "stages": opts.stages,
            "survivors": opts.survivors,
            "test_windows": int(test.shape[0]),
            "test_all": args.windows_2048 is None,
            "proxy_forward_2048_s": fwd,
        }
        for sampler in args.samplers:
            search_rows(args, p, sampler, goal, ratio, rows, cfg, tok_gguf, fp, test)


def search_rows(
    args, p, sampler: str, goal: str, ratio: float, rows: list, cfg: dict, tok_gguf, fp, test: torch.Tensor
) -> None:
    """One search, then its seeds and winner compiled, evaluated (and timed): rows of `rows`."""
    recipe, lm = p.recipe, p.lm
    options = recipe.allocation.search.model_copy(update={"sampler": sampler, "trials": args.trials})
    built: dict = {}  # the models the re-scoring compiled, by plan, evaluated below without a rebuild
    args.compiler = keeping_compiler(sequential_compiler(recipe, lm, p.calib), built)
    t = time.perf_counter()
    res = run_search(
        lm.model,
        lm.adapter,
        p.calib,
        p.heldout,
        p.spec,
        p.layers,
        options,
        storage=None,
        n_trials=args.trials,
        metric=recipe.importance.metric,
        restore=recipe.restore.method,
        damping=recipe.restore.damping,
        progress=True,
        cache_kwargs={"weights_fp": fp},
        compile_fn=None if args.compile == "stitched" else args.compiler,
        speed=p.speed,
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
    write_plots(res, Path(args.out).parent / plot_dir(goal, sampler, args.model, args.compile))
    kl_key = "compiled" if res.rescored else "value"
    group = (goal, args.compile)
    for seed in ("uniform", "cfsp"):
        if seed not in res.seeds:
            continue
        plan = Plan.from_dict(res.seeds[seed]["plan"])
        ev, compile_s = compiled_eval(lm, p.calib, plan, test, args, built, tok_gguf)
        rows[:] = [r for r in rows if (_group(r), r["sampler"]) != (group, seed)]
        rows.append(
            {
                "goal": goal,
                "ratio": ratio,
                "sampler": seed,
                "compile": args.compile,
                "kl": res.seeds[seed][kl_key],
                **ev,
                "compile_s": compile_s,
                "plan": plan.to_dict(),
                **predicted(p, plan),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    ev, compile_s = compiled_eval(lm, p.calib, res.best_plan, test, args, built, tok_gguf)
    built.clear()
    row = {
        "goal": goal,
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
        "trials_s": sum(durations),
        "evaluations": len(trials),
        "pruned": sum(x.state.name == "PRUNED" for x in trials),
        "tokens_scored": tokens,
        "s_per_eval": sum(durations) / max(len(durations), 1),
        "proxy_forward_2048_s": cfg["proxy_forward_2048_s"],  # measured in this row's own run
        # decoder layers the trials ran from (search/prefix.py): mean share of the layers skipped
        "prefix_skipped": sum(x.user_attrs.get("from_layer", 0) for x in trials)
        / max(len(trials), 1)
        / lm.adapter.num_layers,
        "plan": res.best_plan.to_dict(),  # the winner, to compile or to put in a recipe table
        **predicted(p, res.best_plan),
    }
    rows[:] = [r for r in rows if (_group(r), r["sampler"]) != (group, sampler)] + [row]
    print(json.dumps(row), flush=True)
    write(args, rows, cfg)


def predicted(p, plan: Plan) -> dict:
    """The latency model's predicted share of dense time per phase (searches held to a speed goal)."""
    return {"predicted": p.speed.ratios(plan)} if p.speed is not None else {}


def _group(r: dict) -> tuple:
    return (r.get("goal") or f"params {r['ratio']:.2f}", r.get("compile", "stitched"))


def _speed(r: dict, phase: str) -> str:
    """Measured speed-up over dense (median ratio, +- spread; `~` when the spread does not support it)."""
    sp = r.get("speed", {}).get(phase)
    if sp is None:
        return "-"
    pred = r.get("predicted", {}).get(phase)
    mark = "" if sp["supported"] else "~"
    guess = f" (pred. {1 / pred:.2f})" if pred else ""
    return f"{mark}{sp['speedup']:.2f} +-{sp['spread']:.0%}{guess}"


def _no_boolq(r: dict) -> str:
    """The zero-shot mean without boolq (the task where a 135M model sits at the majority class)."""
    zs = {k: v for k, v in r.get("zeroshot", {}).items() if k != "boolq" and v == v}
    return f"{sum(zs.values()) / len(zs):.4f}" if zs else "-"


def write(args: argparse.Namespace, rows: list[dict], cfg: dict) -> None:
    order = {"uniform": 0, "cfsp": 1}
    rows = sorted(
        rows,
        key=lambda r: (_group(r), order.get(r["sampler"], 2), r["sampler"]),
    )
    base = {(_group(r), r["sampler"]): r for r in rows if r["sampler"] in order}
    fwd = cfg["proxy_forward_2048_s"]
    lines = [
        "# Searched vs uniform and CFSP allocation, SmolLM2-135M, FASP scores + least-squares restoration",
        "",
        "Commands (each row's own is in the .json):  ",
        *[f"`{c}`  " for c in dict.fromkeys(r["command"] for r in rows if "command" in r)],
        f"Machine: {machine()}; search and compile in float32, evaluation in {args.eval_dtype}  ",
        "Recipes: recipes_examples/search-NN.yaml (= fasp-NN.yaml with `allocation: search`; budget `params N`) and "
        "search-latency-NN.yaml (budget `prefill latency N`: the search held to the latency model's predicted time, "
        "MLP widths, KV groups and whole sublayers in its space; `removed`: the share of decoder linear parameters "
        "each row removes). "
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
        f"over 2048 held-out tokens (latest run: {fwd:.1f} s; each row's ratio uses its own run's). "
        "llama.cpp columns: dense time / this model's time (f16 GGUF, prompt of 512 WikiText-2 test tokens, 32 decode "
        "steps, medians of alternating rounds against dense, +- the combined interquartile spread; `~`: the spread "
        "does not support a difference; pred.: the latency model's prediction).",
        "",
        "| budget | compile | allocation | removed | ppl@2048 | vs uniform | vs CFSP | zero-shot mean | w/o boolq | "
        "KL held-out | llama.cpp prefill x dense | decode x dense | DB build s | search s | rescore s | "
        "evaluations (pruned) | tokens scored | s/eval | eval / proxy fwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
            f"| {_group(r)[0]} | {r.get('compile', 'stitched')} | {r['sampler']} | {r.get('removed', r['ratio']):.1%} | {r['ppl']:.2f} | "
            f"{gains[0]} | {gains[1]} | {r['zeroshot_mean']:.4f} | {_no_boolq(r)} | {r['kl']:.4f} | "
            f"{_speed(r, 'prefill')} | {_speed(r, 'decode')} | {rest} |"
        )
    for r in rows:
        if r["sampler"] not in order:
            d = plot_dir(_group(r)[0], r["sampler"], args.model, r.get("compile", "stitched"))
            lines += [
                "",
                f"{_group(r)[0]}, {r['sampler']}, {r.get('compile', 'stitched')}: kept fraction per layer and "
                "structure (winner vs uniform), fitness history:",
                "",
                f"![allocation]({d}/allocation.png) ![history]({d}/history.png)",
            ]
    if plot_speed(rows, Path(args.out).parent / "search-speed.png"):
        lines += [
            "",
            "Quality against measured llama.cpp prefill speed (every row timed; dense from quality.json):",
            "",
            "![quality vs speed](search-speed.png)",
        ]
    write_results(args.out, {"config": cfg, "rows": rows}, lines)


def plot_speed(rows: list[dict], path: Path) -> bool:
    """Perplexity against measured prefill speed-up, one marker per allocation, one colour per budget."""
    timed = [r for r in rows if "speed" in r]
    if not timed:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = json.loads((Path(__file__).parent / "results" / "quality.json").read_text())["dense"]["ppl"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([1.0], [dense], marker="*", s=160, color="black", label="dense")
    marks = {"uniform": "s", "cfsp": "^"}
    goals = sorted({_group(r)[0] for r in timed})
    colours = dict(zip(goals, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for r in timed:
        g = _group(r)[0]
        ax.scatter(
            r["speed"]["prefill"]["speedup"], r["ppl"], marker=marks.get(r["sampler"], "o"), color=colours[g]
        )
    for g in goals:
        ax.plot([], [], color=colours[g], label=g)
    for name, m in {**marks, "searched": "o"}.items():
        ax.scatter([], [], marker=m, color="grey", label=name)
    ax.set_xlabel("llama.cpp prefill speed-up over dense (measured)")
    ax.set_ylabel("WikiText-2 test perplexity @2048")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main()
