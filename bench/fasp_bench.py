"""Benchmark: FASP on SmolLM2-135M at 10/20/30% of decoder linear parameters.

Not a test. Writes bench/results/fasp.md (+ .json) incrementally, with the command and
machine beside the table. Perplexity is WikiText-2 test in the standard protocol on a fixed
prefix of the test set (see --windows-512 / --windows-2048) to fit a 2-core CPU.

    python bench/fasp_bench.py --ratios 0.1 0.2 0.3
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
from _results import machine, write_results

from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.recipe.compile import BudgetSpec, uniform_plan
from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.measure.timing import measure_speed
from secateur.runtime.prune.sequential import prune_sequential
from secateur.runtime.store.data import calibration_windows, eval_windows, load_text, tokenize_text
from secateur.runtime.store.loader import load_model

VARIANTS = {  # name: (metric, restore)
    "FASP + restore": ("fasp", "least_squares"),
    "FASP, no restore": ("fasp", "none"),
    "magnitude floor": ("magnitude", "none"),
}


@torch.inference_mode()
def calibration_forward_seconds(model: torch.nn.Module, calib: torch.Tensor, batch: int) -> float:
    """The full model's forward pass over the calibration set alone (the reference cost)."""
    t = time.perf_counter()
    for s in range(0, calib.shape[0], batch):
        model(input_ids=calib[s : s + batch], use_cache=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows-512", type=int, default=32)
    ap.add_argument("--windows-2048", type=int, default=8)
    ap.add_argument("--multiple-of", type=int, default=8)
    ap.add_argument("--out", default="bench/results/fasp")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m", dtype="float32", device="cpu")
    val = tokenize_text(lm.tokenizer, load_text("wikitext2", "validation"))
    test = tokenize_text(lm.tokenizer, load_text("wikitext2", "test"))
    calib = calibration_windows(val, args.n_samples, args.seqlen, 0)
    ev = {512: eval_windows(test, 512, args.windows_512), 2048: eval_windows(test, 2048, args.windows_2048)}
    dense = lm.model
    fwd_s = calibration_forward_seconds(dense, calib, 8)
    rows = []

    def evaluate(
        name: str, ratio: float, model: torch.nn.Module, prune_s: float | None, phases: dict | None = None
    ) -> dict:
        row = {
            "phases_s": phases,
            "variant": name,
            "ratio": ratio,
            "prune_s": prune_s,
            "calib_forward_s": fwd_s,
            "params": total_params(model),
            "decoder_linear_params": decoder_linear_params(model, lm.adapter),
            "flops_per_token": flops_per_token(model, lm.adapter, 512),
        }
        for L, w in ev.items():
            row[f"ppl_{L}"] = perplexity(model, w, batch_size=1)
        if model is not dense:
            sp = measure_speed(
                {"dense": dense, "pruned": model},
                dense.config.vocab_size,
                prefill_len=512,
                decode_tokens=32,
                repeats=5,
            )
            row["prefill_speedup"] = sp["pruned"].prefill_tok_s / sp["dense"].prefill_tok_s
            row["decode_speedup"] = sp["pruned"].decode_tok_s / sp["dense"].decode_tok_s
            row["prefill_tok_s"] = sp["pruned"].prefill_tok_s
            row["dense_prefill_tok_s"] = sp["dense"].prefill_tok_s
            row["decode_tok_s"] = sp["pruned"].decode_tok_s
            row["dense_decode_tok_s"] = sp["dense"].decode_tok_s
        rows.append(row)
        write(args, rows)
        print(json.dumps(row), flush=True)
        return row

    evaluate("dense", 0.0, dense, None)
    for ratio in args.ratios:
        for name in args.variants:
            metric, restore = VARIANTS[name]
            model = copy.deepcopy(dense)
            spec = BudgetSpec(fraction=ratio, multiple_of=args.multiple_of)
            plan = uniform_plan(model, lm.adapter, spec, list(range(lm.adapter.num_layers)), metric, restore)
            t = time.perf_counter()
            res = prune_sequential(model, lm.adapter, calib, plan, batch_size=8, progress=False)
            evaluate(
                name, ratio, model, time.perf_counter() - t, {k: round(v, 1) for k, v in res.phases.items()}
            )
            del model


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    dense = rows[0]
    lines = [
        "# FASP on SmolLM2-135M (WikiText-2)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}; fp32 on cpu  ",
        f"Calibration: {args.n_samples} x {args.seqlen} tokens of wiki.valid.raw (seed 0). Perplexity: WikiText-2 "
        f"test, standard protocol, first {args.windows_512} windows of 512 and first {args.windows_2048} windows "
        f"of 2048 tokens. Speed: prefill of 512 tokens and 32-token greedy decode, batch 1, dense and pruned "
        f"measured alternately in one process, medians of 5. Prune time vs the full model's forward pass over "
        f"the same calibration set alone ({dense['calib_forward_s']:.1f} s).",
        "",
        "| variant | removed | params | decoder linear | FLOPs/token | ppl@512 | ppl@2048 | ppl ratio@2048 "
        "| prune s | prune / calib fwd | prefill x | decode x | realized gain |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fr = dense["flops_per_token"] / r["flops_per_token"]
        gain = (r["prefill_speedup"] - 1) / (fr - 1) if "prefill_speedup" in r and fr > 1 else None
        lines.append(
            f"| {r['variant']} | {r['ratio']:.0%} | {r['params']:,} | {r['decoder_linear_params']:,} | "
            f"{r['flops_per_token']:,} | {r['ppl_512']:.2f} | {r['ppl_2048']:.2f} | "
            f"{r['ppl_2048'] / dense['ppl_2048']:.3f} | "
            + (
                f"{r['prune_s']:.1f} | {r['prune_s'] / r['calib_forward_s']:.2f} | "
                if r["prune_s"]
                else "- | - | "
            )
            + (
                f"{r['prefill_speedup']:.2f} | {r['decode_speedup']:.2f} | "
                if "prefill_speedup" in r
                else "- | - | "
            )
            + (f"{gain:.2f} |" if gain is not None else "- |")
        )
    write_results(args.out, rows, lines)


if __name__ == "__main__":
    main()
