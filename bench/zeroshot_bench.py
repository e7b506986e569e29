"""Benchmark: zero-shot accuracy of dense and FASP-pruned SmolLM2-135M on the six local tasks.

Not a test. Prunes SmolLM2 with uniform FASP + restoration at each ratio (calibration on
wiki.valid.raw), then runs piqa, arc_easy, arc_challenge, hellaswag, winogrande and boolq through
lm-eval (Secateur's offline task configs, lm-eval's standard zero-shot prompts) on the dense and
each pruned model, one task at a time so every task's wall time is recorded. `--limit N` scores
the first N documents of each task (the full sets take hours on a 2-core CPU: the table shows the
time measured and the time the full set would take at the same rate). Writes
bench/results/zeroshot.md (+ .json) after every model.

    python bench/zeroshot_bench.py --ratios 0.2 0.3 --limit 200
    python bench/zeroshot_bench.py --tasks hellaswag --resume   # one task more; cells already measured are kept

`--resume` keeps every (model, task) cell of the existing results that was scored on the same
number of documents, so the full benchmark (hours on a 2-core CPU) can be run a few tasks at a time.
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

from secateur.graph.count import decoder_linear_params
from secateur.recipe.compile import BudgetSpec, uniform_plan
from secateur.runtime.measure.zeroshot import LOCAL_TASKS, run_zeroshot, task_file
from secateur.runtime.prune.sequential import prune_sequential
from secateur.runtime.store.data import (
    calibration_windows,
    default_data_root,
    iter_jsonl,
    load_text,
    tokenize_text,
)
from secateur.runtime.store.loader import load_model


def docs_in(task: str, root: Path) -> int:
    """Documents in the task's local file (what a full run scores)."""
    return sum(1 for _ in iter_jsonl(task_file(task, root)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.3], help="none: the dense model only")
    ap.add_argument("--tasks", nargs="+", default=list(LOCAL_TASKS))
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (float32 on every device)")
    ap.add_argument("--out", default="bench/results/zeroshot")
    ap.add_argument("--resume", action="store_true", help="keep cells already measured on as many documents")
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(default_data_root())
    full = {t: docs_in(t, root) for t in LOCAL_TASKS}
    lm = load_model("smollm2-135m", dtype="float32", device=args.device)
    val = tokenize_text(lm.tokenizer, load_text("wikitext2", "validation"))
    calib = calibration_windows(val, args.n_samples, 512, 0)
    old = {(r["model"], r["ratio"]): r for r in earlier_results(args.out, args.resume, {"rows": []})["rows"]}
    rows: list[dict] = []
    models = [("dense", 0.0)] + [("FASP + restore", r) for r in args.ratios]
    for name, ratio in models:
        prev = old.pop((name, ratio), {})
        todo = [t for t in args.tasks if prev.get(t, {}).get("docs") != min(args.limit or full[t], full[t])]
        model = lm.model
        if ratio and todo:
            model = copy.deepcopy(lm.model)
            plan = uniform_plan(model, lm.adapter, BudgetSpec(fraction=ratio, multiple_of=8), list(range(30)))
            prune_sequential(model, lm.adapter, calib, plan, progress=False)
        row: dict = {
            "model": name,
            "ratio": ratio,
            "decoder_linear_params": prev.get("decoder_linear_params")
            or decoder_linear_params(model, lm.adapter),
        }
        row.update({t: v for t, v in prev.items() if t in LOCAL_TASKS})
        for task in todo:
            t = time.perf_counter()
            res = run_zeroshot(model, lm.tokenizer, [task], root, args.limit, args.batch_size)
            scored = min(args.limit or full[task], full[task])
            row[task] = {**res[task], "seconds": time.perf_counter() - t, "docs": scored}
            print(json.dumps({"model": name, "ratio": ratio, "task": task, **row[task]}), flush=True)
        done = [t for t in LOCAL_TASKS if t in row]
        row["mean_acc"] = sum(row[t]["acc"] for t in done) / len(done)
        rows.append(row)
        write(args, rows + list(old.values()), full)
        if model is not lm.model:
            del model


def write(args: argparse.Namespace, rows: list[dict], full: dict[str, int]) -> None:
    tasks = [t for t in LOCAL_TASKS if any(t in r for r in rows)]
    scope = (
        f"the first {args.limit} documents of each task" if args.limit else "the full sets"
    ) + " (with --resume, each cell's documents are in the time table)"
    lines = [
        "# Zero-shot accuracy, SmolLM2-135M, dense vs uniform FASP + restoration",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}; fp32 on {args.device}  ",
        f"lm-eval zero-shot with Secateur's offline task configs (lm-eval's standard prompts), {scope}, "
        f"batch size {args.batch_size}. Pruning calibrated on {args.n_samples} x 512 tokens of wiki.valid.raw. "
        "acc (acc_norm in brackets where lm-eval reports it).",
        "",
        "| model | removed | " + " | ".join(tasks) + " | mean acc (tasks scored) |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for r in rows:
        cells = []
        for t in tasks:
            m = r.get(t)
            if m is None:
                cells.append("—")
                continue
            norm = f" ({m['acc_norm']:.3f})" if m.get("acc_norm") is not None else ""
            cells.append(f"{m['acc']:.3f}{norm}")
        lines.append(
            f"| {r['model']} | {r['ratio']:.0%} | " + " | ".join(cells) + f" | {r['mean_acc']:.3f} |"
        )
    lines += [
        "",
        "Wall time per task (one model), measured and extrapolated to the full set at the same rate:",
        "",
        "| model | " + " | ".join(tasks) + " | total |",
        "|---|" + "---|" * len(tasks) + "---|",
    ]
    for r in rows:
        cells, total, total_full = [], 0.0, 0.0
        for t in tasks:
            if t not in r:
                cells.append("—")
                continue
            s, n = r[t]["seconds"], r[t]["docs"]
            est = s * full[t] / n
            total, total_full = total + s, total_full + est
            cells.append(f"{s:.0f} s ({n} docs; full {full[t]}: ~{est / 60:.0f} min)")
        lines.append(
            f"| {r['model']} {r['ratio']:.0%} | " + " | ".join(cells) + f" | {total / 60:.1f} min "
            f"(full: ~{total_full / 60:.0f} min) |"
        )
    write_results(args.out, {"full_docs": full, "rows": rows}, lines)


if __name__ == "__main__":
    main()
