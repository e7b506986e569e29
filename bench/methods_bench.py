"""Benchmark: pruning methods side by side on SmolLM2-135M at 20% and 30% of decoder linear parameters.

Not a test. Every method runs through `secateur.api.prune` with the recipe
recipes_examples/<method>-<percent>.yaml (a registered method without its own recipe uses the
FASP recipe with `method:` replaced), overridden for calibration size, budget and evaluation.
The pruned folder is reloaded with `load_pruned` and measured here, against the dense model,
in one process: WikiText-2 test perplexity at seqlen 2048 on a fixed prefix of windows, prune
time (the stages' own time, without loading and saving), parameters, and prefill / decode
speedups measured alternately with the dense model (runtime.speed.measure_speed).
Writes bench/results/methods.md (+ .json) after every row, with the command and machine above
the table.

    python bench/methods_bench.py                                  # fasp blockpruner sprint multipruner, 20% and 30%
    python bench/methods_bench.py --methods cfsp flap --ratios 0.2
    python bench/methods_bench.py --dry-run                        # resolve and explain every recipe, prune nothing
    python bench/methods_bench.py --model gemma3-270m --recipe-prefix gemma3- --methods fasp cfsp blockpruner \
        --ratios 0.2 --out bench/results/methods-gemma3-270m     # Gemma 3 270M from recipes_examples/gemma3-*.yaml
    python bench/methods_bench.py --model TINY_DIR --eval-seqlen 128 --seqlen 64 --n-samples 8 --out /tmp/m  # smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import earlier_results, machine, plot_tradeoff, write_results

from secateur.api import prune
from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.recipe.load import load_recipe
from secateur.recipe.schema import Recipe
from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.measure.timing import measure_speed
from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.loader import load_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "recipes_examples"
DEFAULT_METHODS = ["fasp", "blockpruner", "sprint", "multipruner"]
MODEL = "smollm2-135m"
HELDOUT_METHODS = {"blockpruner", "sprint", "multipruner", "bonsai"}  # score on held-out windows


def recipe_for(method: str, ratio: float, args: argparse.Namespace, out_dir: Path) -> tuple[Recipe, Path]:
    """The example recipe of `method` at `ratio` (or the FASP one with `method` swapped), overridden."""
    pct = int(round(ratio * 100))
    path = EXAMPLES / f"{args.recipe_prefix}{method}-{pct}.yaml"
    if not path.is_file():
        path = EXAMPLES / f"{method}-{pct}.yaml"  # the method's generic recipe, model overridden
    overrides = [
        f"model.id={args.model}",
        f"model.dtype={args.dtype}",
        f"model.device={args.device}",
        f"calibration.n_samples={args.n_samples}",
        f"calibration.seqlen={args.seqlen}",
        f"calibration.heldout_windows={args.heldout_windows}",
        f"budget.params={ratio}",
        "evaluate.enabled=false",
        f"output.dir={out_dir}",
    ]
    if not path.is_file():
        from secateur.runtime.methods import get_method

        get_method(method)  # fails naming the available methods
        base = EXAMPLES / f"fasp-{pct}.yaml"
        if not base.is_file():
            base = EXAMPLES / "fasp-20.yaml"
        path = base
        overrides += [f"method={method}", "allocation.method=uniform"]  # fasp-20.yaml's is proportional
    return load_recipe(path, overrides), path


def stage_notes(report: dict) -> str:
    """What each stage did, from its PruneResult.extra (sublayers removed, steps, restoration time)."""
    notes = []
    for st in report.get("stages", []):
        bits = [st["method"]]
        if "removed" in st:
            kinds = [k for k, _ in st["removed"]]
            bits.append(
                f"-{kinds.count('attn')} attn -{kinds.count('mlp')} mlp in {st.get('steps', '?')} steps"
            )
            if st.get("seconds_per_candidate"):
                bits.append(f"{st['seconds_per_candidate']:.2f} s/candidate")
            if st.get("restoration_s"):
                bits.append(f"restore {st['restoration_s']:.0f} s")
        notes.append(" ".join(bits))
    return "; ".join(notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument(
        "--heldout-windows",
        type=int,
        default=16,
        help="held-out 256-token windows on which sublayer methods and Bonsai score candidates",
    )
    ap.add_argument("--windows-2048", type=int, default=8, help="first N windows of the test set")
    ap.add_argument("--eval-seqlen", type=int, default=2048, help="perplexity window length")
    ap.add_argument("--model", default=MODEL, help="model reference (a tiny local folder for a smoke run)")
    ap.add_argument(
        "--recipe-prefix", default="", help="use recipes_examples/PREFIX<method>-<pct>.yaml where one exists"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--repeats", type=int, default=5, help="speed measurement rounds (medians)")
    ap.add_argument("--progress", action="store_true", help="show the methods' progress bars")
    ap.add_argument("--dry-run", action="store_true", help="resolve and explain every recipe, prune nothing")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out (same method and budget: replaced), one table for several runs",
    )
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "methods"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.dry_run:
        from secateur.explain import explain

        for ratio in args.ratios:
            for method in args.methods:
                recipe, path = recipe_for(method, ratio, args, Path("unused"))
                ex = explain(recipe)
                d, p = ex.totals["dense"], ex.totals["pruned"]
                stages = ", ".join(f"{s['method']} {s['params_to_remove']:,}" for s in ex.stages)
                print(
                    f"{method} @ {ratio:.0%}: {path.relative_to(REPO)} -> stages [{stages}]; "
                    f"decoder linear {d['decoder_linear_params']:,} -> {p['decoder_linear_params']:,} by shapes alone"
                )
        return

    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    dense = lm.model
    test = tokenize_text(lm.tokenizer, load_text("wikitext2", "test"))
    windows = eval_windows(test, args.eval_seqlen, args.windows_2048)
    # 512-token prefill, shorter only for a model with a shorter context (tiny smoke-run models)
    args.prefill = min(512, int(getattr(dense.config, "max_position_embeddings", 512) or 512))
    rows: list[dict] = earlier_results(args.out, args.append, [])
    work = Path(tempfile.mkdtemp(prefix="methods-bench-"))
    command = "python " + " ".join(sys.argv)

    def add(row: dict) -> None:
        row["command"] = command
        rows[:] = [r for r in rows if (r["method"], r["ratio"]) != (row["method"], row["ratio"])] + [row]
        write(args, rows)
        print(json.dumps(row), flush=True)

    def sizes(model: torch.nn.Module) -> dict:
        return {
            "params": total_params(model),
            "decoder_linear_params": decoder_linear_params(model, lm.adapter),
            "flops_per_token": flops_per_token(model, lm.adapter, args.eval_seqlen),
        }

    add(
        {
            "method": "dense",
            "ratio": 0.0,
            **sizes(dense),
            "ppl": perplexity(dense, windows, batch_size=1),
        }
    )
    try:
        for ratio in args.ratios:
            for method in args.methods:
                out_dir = work / f"{method}-{ratio}"
                recipe, path = recipe_for(method, ratio, args, out_dir)
                t = time.perf_counter()
                outcome = prune(recipe=recipe, overwrite=True, progress=args.progress, log=lambda s: None)
                wall = time.perf_counter() - t
                pruned = load_pruned(outcome.output, dtype=dense.dtype, device=args.device)
                phases = outcome.report["phases"]
                row = {
                    "method": method,
                    "recipe": str(path.relative_to(REPO)),
                    "ratio": ratio,
                    **sizes(pruned),
                    "ppl": perplexity(pruned, windows, batch_size=1),
                    "prune_s": phases.get("total"),
                    "pipeline_s": wall,
                    "stages": outcome.report["stages"],
                    "notes": stage_notes(outcome.report)
                    + (f"; {args.heldout_windows} held-out windows" if method in HELDOUT_METHODS else ""),
                }
                sp = measure_speed(
                    {"dense": dense, "pruned": pruned},
                    dense.config.vocab_size,
                    prefill_len=args.prefill,
                    decode_tokens=32,
                    repeats=args.repeats,
                )
                row["prefill_speedup"] = sp["pruned"].prefill_tok_s / sp["dense"].prefill_tok_s
                row["decode_speedup"] = sp["pruned"].decode_tok_s / sp["dense"].decode_tok_s
                row["prefill_tok_s"], row["dense_prefill_tok_s"] = (
                    sp["pruned"].prefill_tok_s,
                    sp["dense"].prefill_tok_s,
                )
                row["decode_tok_s"], row["dense_decode_tok_s"] = (
                    sp["pruned"].decode_tok_s,
                    sp["dense"].decode_tok_s,
                )
                add(row)
                del pruned
                shutil.rmtree(outcome.output, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    dense = next(r for r in rows if r["method"] == "dense")
    rows = [dense] + sorted((r for r in rows if r is not dense), key=lambda r: (r["ratio"], r["method"]))
    lines = [
        f"# Pruning methods on {args.model} (WikiText-2)",
        "",
        "Commands (each row records its own in the .json):  ",
        *[f"`{c}`  " for c in dict.fromkeys(r.get("command", "python " + " ".join(sys.argv)) for r in rows)],
        f"Machine: {machine()}; {args.dtype} on {args.device}  ",
        f"Calibration: {args.n_samples} x {args.seqlen} tokens of wiki.valid.raw (seed 0); sublayer methods and Bonsai "
        f"score candidates on held-out 256-token windows from the tail of the same file (how many: notes). Perplexity: WikiText-2 test, "
        f"standard protocol, first {args.windows_2048} windows of {args.eval_seqlen} tokens. Speed: prefill of {args.prefill} tokens and "
        f"32-token greedy decode, batch 1, dense and pruned measured alternately in one process, medians of "
        f"{args.repeats}. Prune s: the stages' own time (no model loading or saving). Removed: share of the "
        f"dense model's decoder linear parameters actually removed (sublayer removal overshoots by up to one "
        f"branch).",
        "",
        f"| method | budget | removed | params | decoder linear | ppl@{args.eval_seqlen} | ppl ratio | prune s "
        "| prefill x | decode x | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        removed = 1 - r["decoder_linear_params"] / dense["decoder_linear_params"]
        lines.append(
            f"| {r['method']} | {r['ratio']:.0%} | {removed:.1%} | {r['params']:,} | {r['decoder_linear_params']:,} "
            f"| {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.3f} | "
            + (f"{r['prune_s']:.1f} | " if r.get("prune_s") is not None else "- | ")
            + (
                f"{r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | "
                if "prefill_speedup" in r
                else "- | - | "
            )
            + f"{r.get('notes', '')} |"
        )
    png = plot_tradeoff(
        rows, Path(args.out).with_suffix(".png"), f"{args.model}, {args.dtype} on {args.device}"
    )
    if png is not None:
        lines += [
            "",
            "Perplexity vs measured speedup (circles: 20%, squares: 30%):",
            "",
            f"![trade-off]({png.name})",
        ]
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
