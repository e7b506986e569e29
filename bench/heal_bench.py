"""Healing on SmolLM2: quality recovered per token of distillation, on this machine.

Prunes an example recipe once (no healing), then heals copies of that model with growing token
budgets (0 = the unhealed model) through the same code a recipe's `heal:` runs (runtime/heal),
and evaluates each on the full WikiText-2 test set at 2048 and the zero-shot tasks, dense beside.

    python bench/heal_bench.py --recipe fasp-20 --tokens 0 16384 65536 262144
    python bench/heal_bench.py --recipe fasp-20 --tokens 65536 --data wikitext2:validation --append
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from _results import earlier_results, machine, write_results
from quality_bench import evaluate, no_boolq

from secateur.api import prune
from secateur.graph.count import decoder_linear_params
from secateur.recipe.heal import Heal, HealData
from secateur.recipe.load import load_recipe
from secateur.runtime.heal.run import finish, heal_model, prepare
from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
from secateur.runtime.store.fingerprint import model_fingerprint
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.loader import DTYPES, load_model

REPO = Path(__file__).resolve().parents[1]


def heal_row(args, dense, pruned_dir: Path, tokens: int, data: str) -> tuple[torch.nn.Module, dict]:
    """A fresh copy of the pruned model healed on `tokens` tokens (0: as pruned)."""
    model = load_pruned(pruned_dir, dtype=torch.float32)
    if tokens == 0:
        return model, {"heal_s": 0.0, "tokens_per_s": None, "prep_s": 0.0}
    name, _, split = data.partition(":")
    heal = Heal(
        tokens=tokens,
        seqlen=args.seqlen,
        batch=args.batch,
        micro_batch=args.micro_batch,
        lr=args.lr,
        top_k=args.top_k,
        train=args.train,
        precision=args.precision,
        checkpoint_every=10**6,
        data=HealData(dataset=name, split=split or "validation"),
    )
    t = time.perf_counter()
    prep = prepare(heal, dense.model, dense.tokenizer, model_fingerprint(dense.model), None, None, print)
    prep_s = time.perf_counter() - t
    shapes_pruned = set(range(len(dense.adapter.layers(dense.model))))
    res = heal_model(
        model, dense.adapter.layers(model), heal, prep, model_fingerprint(model), shapes_pruned, print
    )
    finish(res)
    return model, {
        "heal_s": res.seconds,
        "tokens_per_s": res.tokens_per_s,
        "prep_s": prep_s,
        "precision": res.precision,
        "data_source": prep.data["source"],
        "loss_first_last": [res.loss[0][1], res.loss[-1][1]] if res.loss else None,
    }


def table(rows: list[dict], dense: dict, args) -> list[str]:
    out = [
        "# Healing: distillation from the dense model after pruning (SmolLM2-135M, this CPU)",
        "",
        f"Command: `python bench/heal_bench.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {machine()}; heal in float32 master weights with the precision shown, evaluation in "
        f"{args.eval_dtype}  ",
        (
            f"Perplexity: the first {args.windows} non-overlapping 2048-token windows of wiki.test.raw"
            if args.windows
            else "Perplexity: all non-overlapping 2048-token windows of wiki.test.raw"
        )
        + ". Zero-shot: mean acc of piqa, "
        "arc_easy, arc_challenge, hellaswag, winogrande, boolq on the first "
        f"{args.limit} documents of each task. Heal: KL to the dense model's top-{args.top_k} "
        f"(+ rest) next-token distribution, seqlen {args.seqlen}, batch {args.batch}, lr {args.lr:g} cosine, "
        f"train {args.train}, embeddings and head frozen.",
        "",
        "| recipe | heal data | tokens | ppl@2048 | x dense | gap closed | zero-shot mean | w/o boolq | heal s | "
        "tokens/s | data+teacher s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| dense | - | - | {dense['ppl']:.2f} | 1.000 | - | {dense['zeroshot_mean']:.4f} | "
        f"{no_boolq(dense):.4f} | - | - | - |",
    ]
    for r in rows:
        base = next((b for b in rows if b["recipe"] == r["recipe"] and b["tokens"] == 0), None)
        gap = (
            f"{(base['ppl'] - r['ppl']) / (base['ppl'] - dense['ppl']):.0%}" if base and r["tokens"] else "-"
        )
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        out.append(
            f"| {r['recipe']} | {r['data'] if r['tokens'] else '-'} | {r['tokens']:,} | {r['ppl']:.2f} | "
            f"{r['ppl'] / dense['ppl']:.3f} | {gap} | {r['zeroshot_mean']:.4f} | {no_boolq(r):.4f} | "
            f"{r['heal_s']:.0f} | {tps} | {r['prep_s']:.0f} |"
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fasp-20")
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 16384, 65536, 262144])
    ap.add_argument("--data", default="self", help="self, or DATASET:SPLIT (never test)")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--train", default="all")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--windows", type=int, default=None)
    ap.add_argument("--eval-dtype", default="bfloat16")
    ap.add_argument(
        "--dense-from",
        default=None,
        help="reuse the dense row of a quality_bench .json measured with the same protocol (eval dtype, limit, windows)",
    )
    ap.add_argument("--pruned", default=None, help="keep the pruned model here and reuse it when it exists")
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "heal"))
    args = ap.parse_args()
    out = Path(args.out)
    prev = earlier_results(out, args.append, {})
    rows = prev.get("rows", [])
    dense = load_model("smollm2-135m", "float32", "cpu")
    windows = eval_windows(tokenize_text(dense.tokenizer, load_text("wikitext2", "test")), 2048, args.windows)
    dense_ev = prev.get("dense")
    if dense_ev is None and args.dense_from:
        src = json.loads(Path(args.dense_from).read_text())
        same = src["args"].get("eval_dtype") == args.eval_dtype and src["args"].get("limit") == args.limit
        if same and src["dense"].get("windows") == windows.shape[0]:
            dense_ev = src["dense"] | {"limit": args.limit, "from": args.dense_from}
    if dense_ev is None or dense_ev.get("windows") != windows.shape[0] or dense_ev.get("limit") != args.limit:
        copy = load_model("smollm2-135m", "float32", "cpu")
        dense_ev = evaluate(copy.model, copy.tokenizer, windows, DTYPES[args.eval_dtype], None, args.limit)
        dense_ev |= {"windows": int(windows.shape[0]), "limit": args.limit}
        print(f"dense: ppl {dense_ev['ppl']:.3f}, zero-shot {dense_ev['zeroshot_mean']:.4f}", flush=True)
        del copy
    recipe = load_recipe(
        REPO / "recipes_examples" / f"{args.recipe}.yaml",
        ["evaluate.enabled=false", "model.dtype=float32", "model.device=cpu"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        pruned_dir = Path(args.pruned) if args.pruned else Path(tmp) / "pruned"
        if not (pruned_dir / "recipe.lock.yaml").is_file():
            prune(recipe=recipe, output=pruned_dir, progress=False, log=lambda s: None)
        for tokens in args.tokens:
            model, info = heal_row(args, dense, pruned_dir, tokens, args.data)
            removed = 1 - decoder_linear_params(model, dense.adapter) / decoder_linear_params(
                dense.model, dense.adapter
            )
            ev = evaluate(model, dense.tokenizer, windows, DTYPES[args.eval_dtype], None, args.limit)
            row = {
                "recipe": args.recipe,
                "data": args.data,
                "tokens": tokens,
                "removed": removed,
                **info,
                **ev,
            }
            rows = [
                r for r in rows if (r["recipe"], r["data"], r["tokens"]) != (args.recipe, args.data, tokens)
            ]
            rows.append(row)
            rows.sort(key=lambda r: (r["recipe"], r["tokens"] > 0, r["data"], r["tokens"]))
            print(
                f"{args.recipe} +{tokens:,} {args.data}: ppl {ev['ppl']:.3f} ({ev['ppl'] / dense_ev['ppl']:.3f}x), "
                f"zero-shot {ev['zeroshot_mean']:.4f} (w/o boolq {no_boolq(ev):.4f}), heal {info['heal_s']:.0f} s",
                flush=True,
            )
            write_results(
                out, {"dense": dense_ev, "rows": rows, "args": vars(args)}, table(rows, dense_ev, args)
            )


if __name__ == "__main__":
    main()
