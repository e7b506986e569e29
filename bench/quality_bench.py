"""Benchmark: the quality engine's options on SmolLM2-135M, every row against dense in one run.

Not a test. Each row prunes with `secateur.api.prune` (fp32, calibration from wiki.valid) from an
example recipe plus overrides, reloads the pruned folder with `load_pruned`, and measures in this
process: WikiText-2 test perplexity on ALL non-overlapping windows of 2048 tokens (148 for
SmolLM2), the mean accuracy of the six zero-shot tasks on the same `--limit` documents for every
row, parameters removed, prune time (the stages' own time) and its ratio to one forward of the
dense model over the same calibration windows. Evaluation runs in `--eval-dtype` (bf16 by default:
this CPU has AMX; the dense row is evaluated the same way). Writes bench/results/quality.md (+ .json)
after every row.

    python bench/quality_bench.py                                   # every variant at 20% and 30%
    python bench/quality_bench.py --variants fasp ec obs --ratios 0.2 --append
    python bench/quality_bench.py --model gemma3-270m --recipe-prefix gemma3- --variants fasp cfsp blockpruner \
        --ratios 0.2 --out bench/results/quality-gemma3-270m
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import earlier_results, machine, write_results

from secateur.api import prune
from secateur.graph.count import decoder_linear_params
from secateur.recipe.load import load_recipe
from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.measure.zeroshot import LOCAL_TASKS, run_zeroshot
from secateur.runtime.store.data import (
    calibration_windows,
    eval_windows,
    load_text,
    split_tokens,
    tokenize_text,
)
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.loader import DTYPES, load_model

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "recipes_examples"
MODEL = "smollm2-135m"
OBS_EC = ["importance.selection=obs", "restore.error_correction=1.0"]
PLAIN = ["importance.selection=score", "restore.error_correction=0.0"]
UNIFORM = "allocation.method=uniform"  # fasp-20.yaml allocates by angular importance since 2026-11-30
# name: (example recipe stem, overrides, what it is)
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "fasp": (
        "fasp",
        ["importance.selection=score", "restore.error_correction=0.0"],
        "FASP as before this issue",
    ),
    "ec": (
        "fasp",
        ["importance.selection=score", "restore.error_correction=1.0"],
        "+ error-correcting restoration (full strength)",
    ),
    "ec0.25": ("fasp", ["restore.error_correction=0.25"], "+ error correction at strength 0.25"),
    "quality": ("quality", [], "recipes_examples/quality-NN.yaml as committed"),
    "main": ("fasp", [], "recipes_examples/fasp-NN.yaml as committed (fasp-20: the README's main job)"),
    "obs": ("fasp", ["importance.selection=obs", "restore.error_correction=0.0"], "+ OBS selection"),
    "obs+ec": (
        "fasp",
        OBS_EC,
        "OBS + error correction",
    ),
    "obs+ec+refine": (
        "fasp",
        [*OBS_EC, "restore.refine_steps=24", "restore.refine_lr=2.0e-4"],
        "OBS + EC + 24 Adam steps per MLP branch (sub-block reconstruction)",
    ),
    "obs+ec+heads": (
        "fasp",
        [*OBS_EC, "targets.attention=q_head"],
        "OBS + EC, MLP channels and query heads at one budget",
    ),
    "obs+ec+kv": (
        "fasp",
        [*OBS_EC, "targets.attention=kv_group"],
        "OBS + EC, MLP channels and KV groups at one budget",
    ),
    "obs+ec-128x512": (
        "fasp",
        [*OBS_EC, "calibration.n_samples=128"],
        "OBS + EC, calibration 128 x 512",
    ),
    "obs+ec-256x512": (
        "fasp",
        [*OBS_EC, "calibration.n_samples=256"],
        "OBS + EC, calibration 256 x 512",
    ),
    "obs+ec-128x2048": (
        "fasp",
        [
            *OBS_EC,
            "calibration.n_samples=128",
            "calibration.seqlen=2048",
        ],
        "OBS + EC, calibration 128 x 2048",
    ),
    "fasp-128x512": ("fasp", [*PLAIN, "calibration.n_samples=128"], "FASP, calibration 128 x 512"),
    "fasp-256x512": ("fasp", [*PLAIN, "calibration.n_samples=256"], "FASP, calibration 256 x 512"),
    "fasp-128x2048": (
        "fasp",
        [*PLAIN, "calibration.n_samples=128", "calibration.seqlen=2048"],
        "FASP, calibration 128 x 2048",
    ),
    "cfsp-128x512": ("cfsp", ["calibration.n_samples=128"], "CFSP, calibration 128 x 512"),
    "cfsp-256x512": ("cfsp", ["calibration.n_samples=256"], "CFSP, calibration 256 x 512"),
    "fasp+heads": ("fasp", [*PLAIN, "targets.attention=q_head"], "FASP, MLP channels and query heads"),
    "fasp+kv": ("fasp", [*PLAIN, "targets.attention=kv_group"], "FASP, MLP channels and KV groups"),
    "refine": (
        "fasp",
        [*PLAIN, "restore.refine_steps=24", "restore.refine_lr=2.0e-4"],
        "FASP + 24 Adam steps per MLP branch (sub-block reconstruction)",
    ),
    "damp0.1": ("fasp", [*PLAIN, "restore.damping=0.1"], "FASP, restoration damping 0.1"),
    "damp0.001": ("fasp", [*PLAIN, "restore.damping=0.001"], "FASP, restoration damping 0.001"),
    "cfsp": ("cfsp", [], "CFSP as in its example recipe"),
    "blockpruner": ("blockpruner", [], "BlockPruner as in its example recipe"),
    "flap": ("flap", [], "FLAP as in its example recipe"),
}


def zeroshot_mean(model, tokenizer, root: str | None, limit: int | None) -> tuple[float, dict]:
    res = run_zeroshot(model, tokenizer, list(LOCAL_TASKS), root, limit, batch_size=16)
    return res["mean"]["acc"], {t: round(m["acc"], 4) for t, m in res.items() if t != "mean"}


def evaluate(model, tok, windows: torch.Tensor, dtype: torch.dtype, root, limit) -> dict:
    model = model.to(dtype)
    t = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=1, progress="perplexity")
    zs, per_task = (
        zeroshot_mean(model, tok, root, limit) if limit else (float("nan"), {"boolq": float("nan")})
    )
    return {"ppl": ppl, "zeroshot_mean": zs, "zeroshot": per_task, "eval_s": time.perf_counter() - t}


@torch.inference_mode()
def calibration_forward_s(model, calib: torch.Tensor, batch: int = 8) -> float:
    """Seconds of one forward of the dense model (fp32) over the calibration windows."""
    t = time.perf_counter()
    for s in range(0, calib.shape[0], batch):
        model(calib[s : s + batch], use_cache=False)
    return time.perf_counter() - t


def no_boolq(r: dict) -> float:
    """Mean accuracy without boolq: pruned SmolLM2s answer "yes" to nearly every boolq question (the
    0.62 majority), which lifts the six-task mean above the dense model's while they got worse."""
    accs = [v for k, v in r["zeroshot"].items() if k != "boolq"] or [float("nan")]
    return sum(accs) / len(accs)


def table(rows: list[dict], dense: dict, args) -> list[str]:
    head = [
        f"# Quality engine on {args.model} (WikiText-2, full test set at 2048, zero-shot mean)",
        "",
        f"Command: `python bench/quality_bench.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}; prune in float32, evaluation in {args.eval_dtype}  ",
        f"Perplexity: all {dense['windows']} non-overlapping 2048-token windows of wiki.test.raw. Zero-shot: mean acc "
        f"of {', '.join(LOCAL_TASKS)} on the first {args.limit} documents of each task (same for every row). "
        "Prune x: prune time over one fp32 forward of the dense model on the same calibration windows.",
        "",
        "| variant | budget | removed | ppl@2048 | ppl ratio | zero-shot mean | w/o boolq | boolq | prune s | prune x | calibration | what |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | 0% | 0.0% | {dense['ppl']:.2f} | 1.000 | {dense['zeroshot_mean']:.4f} | {no_boolq(dense):.4f} | "
        f"{dense['zeroshot']['boolq']:.3f} | - | - | - | |",
    ]
    for r in rows:
        head.append(
            f"| {r['variant']} | {r['budget']:.0%} | {r['removed']:.1%} | {r['ppl']:.2f} | {r['ppl'] / dense['ppl']:.3f} | "
            f"{r['zeroshot_mean']:.4f} | {no_boolq(r):.4f} | {r['zeroshot']['boolq']:.3f} | {r['prune_s']:.1f} | "
            f"{r['prune_x']:.2f} | {r['calibration']} | {r['what']} |"
        )
    return head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["fasp", "ec", "obs", "obs+ec", "cfsp", "flap"])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3])
    ap.add_argument(
        "--limit",
        type=int,
        default=200,
        help="zero-shot documents per task (same for every row; 0: perplexity only, for screens)",
    )
    ap.add_argument("--model", default=MODEL, help="model reference (short name, folder, .gguf)")
    ap.add_argument(
        "--recipe-prefix", default="", help="use recipes_examples/PREFIX<stem>-<pct>.yaml where one exists"
    )
    ap.add_argument("--eval-dtype", default="bfloat16")
    ap.add_argument("--windows", type=int, default=None, help="first N windows only (smoke runs)")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quality"))
    args = ap.parse_args()
    out = Path(args.out)
    prev = earlier_results(out, args.append, {})
    rows = prev.get("rows", [])
    root = None
    lm = load_model(args.model, "float32", "cpu")
    windows = eval_windows(
        tokenize_text(lm.tokenizer, load_text("wikitext2", "test", root)), 2048, args.windows
    )
    dense = prev.get("dense")
    if dense is None or dense.get("windows") != windows.shape[0]:
        dense = evaluate(lm.model, lm.tokenizer, windows, DTYPES[args.eval_dtype], root, args.limit)
        dense["windows"] = int(windows.shape[0])
        print(f"dense: ppl {dense['ppl']:.3f}, zero-shot mean {dense['zeroshot_mean']:.4f}", flush=True)
    lm = load_model(args.model, "float32", "cpu")
    dense_linear = decoder_linear_params(lm.model, lm.adapter)
    cal_tokens = tokenize_text(lm.tokenizer, load_text("wikitext2", "validation", root))
    fwd_cache: dict[tuple[int, int], float] = {}
    for ratio in args.ratios:
        for v in args.variants:
            stem, over, what = VARIANTS[v]
            if stem == "fasp" and v != "main":  # FASP's own uniform share per block, whatever the recipe says
                over = [UNIFORM, *over]
            name = f"{stem}-{int(round(ratio * 100))}.yaml"
            path = EXAMPLES / f"{args.recipe_prefix}{name}"
            recipe = load_recipe(
                path if path.is_file() else EXAMPLES / name,
                [
                    *over,
                    f"model.id={args.model}",
                    f"budget.params={ratio}",
                    "evaluate.enabled=false",
                    "model.dtype=float32",
                    "model.device=cpu",
                ],
            )
            cal = recipe.calibration
            key = (cal.n_samples, cal.seqlen)
            if key not in fwd_cache:
                calib = calibration_windows(
                    split_tokens(cal_tokens, 0.9)[0], cal.n_samples, cal.seqlen, cal.seed
                )
                fwd_cache[key] = calibration_forward_s(lm.model, calib)
            with tempfile.TemporaryDirectory() as tmp:
                res = prune(recipe=recipe, output=Path(tmp) / "out", progress=False, log=lambda s: None)
                phases = res.report["phases"]
                prune_s = phases["total"]  # the stages' own time: no loading, no saving
                model = load_pruned(Path(tmp) / "out")
            removed = 1 - decoder_linear_params(model, lm.adapter) / dense_linear
            ev = evaluate(model, lm.tokenizer, windows, DTYPES[args.eval_dtype], root, args.limit)
            row = {
                "variant": v,
                "budget": ratio,
                "removed": removed,
                "what": what,
                "calibration": f"{cal.n_samples}x{cal.seqlen}",
                "prune_s": prune_s,
                "prune_x": prune_s / fwd_cache[key],
                "phases": phases,
                "recipes": [] if over else [path.stem],  # example recipes this row measures as they are
                "calibration_forward_s": fwd_cache[key],
                **ev,
            }
            rows = [r for r in rows if (r["variant"], r["budget"]) != (v, ratio)] + [row]
            print(
                f"{v} {ratio:.0%}: ppl {ev['ppl']:.3f} ({ev['ppl'] / dense['ppl']:.3f}x), zero-shot "
                f"{ev['zeroshot_mean']:.4f}, prune {prune_s:.0f} s ({row['prune_x']:.2f}x)",
                flush=True,
            )
            order = list(VARIANTS)
            rows.sort(
                key=lambda r: (
                    r["budget"],
                    order.index(r["variant"]) if r["variant"] in order else len(order),
                )
            )
            write_results(out, {"dense": dense, "rows": rows, "args": vars(args)}, table(rows, dense, args))
            assert math.isfinite(ev["ppl"])


if __name__ == "__main__":
    main()
