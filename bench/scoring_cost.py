"""What one BlockPruner/SPRINT candidate costs to score, by the layer it sits in.

Not a test. Times HeldoutScorer.value(i) (layers i..L-1 + LM head + KL to the dense model, from
cached layer inputs) against a bare forward to logits on the same held-out windows, medians of 5.
The reading notes of bench/results/methods.md quote its output.

    python bench/scoring_cost.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from secateur.runtime.allocation.proxy import HeldoutScorer, dense_reference
from secateur.runtime.measure.timing import sync
from secateur.runtime.methods.blockpruner_sprint import BATCH_SIZE, REFERENCE_MB, REFERENCE_TOPK
from secateur.runtime.store.loader import load_model


def median_seconds(fn: Callable[[], object], dev: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m", dtype="float32", device=args.device)
    model, dev = lm.model.eval(), lm.device
    ids = torch.randint(
        0, model.config.vocab_size, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0)
    )
    ref = dense_reference(model, ids, BATCH_SIZE, REFERENCE_MB, REFERENCE_TOPK)
    scorer = HeldoutScorer(model, lm.adapter, ids, ref, "kl")
    n = lm.adapter.num_layers
    print(f"{args.windows} x {args.seqlen} tokens, {dev}, medians of {args.repeats}")
    for start in (0, n // 2, n - 1, n):
        sec = median_seconds(lambda s=start: scorer.value(s), dev, args.repeats)
        print(f"score from layer {start:2d} ({n - start:2d} layers + LM head + KL): {sec:.3f} s")

    def bare() -> None:
        with torch.inference_mode():
            for i in range(0, ids.shape[0], BATCH_SIZE):
                model(input_ids=ids[i : i + BATCH_SIZE].to(dev), use_cache=False)

    print(f"bare forward to logits: {median_seconds(bare, dev, args.repeats):.3f} s")


if __name__ == "__main__":
    main()
