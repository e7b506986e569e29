"""Does the search's 256-token held-out KL rank the latency-0.7 winner and uniform as 2048-token context does?
Compiles both plans sequentially as the recipe does, then KL to dense on the same held-out tokens cut
into windows of 256 and of 2048."""

import copy
import json
from pathlib import Path

import torch

from secateur.graph.plan import Plan
from secateur.recipe.load import load_recipe
from secateur.runtime.store.data import eval_windows
from secateur.search_cmd import search_problem, sequential_compiler

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)
asked = load_recipe(
    str(REPO / "recipes_examples" / "search-latency-70.yaml"), ["model.dtype=float32", "model.device=cpu"]
)
p = search_problem(asked, REPO / "recipes_examples", print)
flat = p.heldout.reshape(-1)
rows = json.load(open(REPO / "bench" / "results" / "search.json"))["rows"]
plans = {
    r["sampler"]: r["plan"]
    for r in rows
    if r.get("goal", "").startswith("prefill") and r["sampler"] != "cfsp"
}
comp = sequential_compiler(p.recipe, p.lm, p.calib)


@torch.inference_mode()
def logprobs(m, seqlen):
    w = eval_windows(flat, seqlen, flat.numel() // seqlen)
    return [
        torch.log_softmax(m(input_ids=w[i : i + 1], use_cache=False).logits.float(), -1)
        for i in range(w.shape[0])
    ]


@torch.inference_mode()
def kl(ref, m, seqlen):
    out = logprobs(m, seqlen)
    tot = n = 0
    for a, b in zip(ref, out):
        tot += (a.exp() * (a - b)).sum().item()
        n += a.shape[1]
    return tot / n


dense = {s: logprobs(p.lm.model, s) for s in (256, 2048)}
for name, plan in plans.items():
    m = copy.deepcopy(p.lm.model)
    comp(m, Plan.from_dict(plan))
    print(name, {s: round(kl(dense[s], m, s), 4) for s in (256, 2048)}, flush=True)
    del m
