"""Check: what rounding SmolLM2's weights to bfloat16 (`output.dtype: source` for its Q4_1 GGUF)
does to WikiText-2 perplexity, computed in float32 on the first windows of the test set.

Not a test.

    python bench/bf16_rounding_check.py --windows 8 --seqlen 512
"""

from __future__ import annotations

import argparse
import copy

import torch

from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.store.data import default_data_root, eval_windows, load_text, tokenize_text
from secateur.runtime.store.io import round_to_dtype
from secateur.runtime.store.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    lm = load_model("smollm2-135m", dtype="float32", device="cpu")
    toks = tokenize_text(lm.tokenizer, load_text("wikitext2", "test", default_data_root()))
    w = eval_windows(toks, args.seqlen, args.windows)
    p32 = perplexity(lm.model, w)
    rounded = copy.deepcopy(lm.model)
    round_to_dtype(rounded, torch.bfloat16)
    pbf = perplexity(rounded, w)
    print(
        f"windows {tuple(w.shape)}: fp32 weights {p32:.4f}, bf16-rounded weights {pbf:.4f}, ratio {pbf / p32:.5f}"
    )


if __name__ == "__main__":
    main()
