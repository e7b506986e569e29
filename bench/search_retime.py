"""Re-time one row of bench/results/search.json in llama.cpp (its first timing ran on a busy machine):
compile its plan as the row was compiled, measure dense vs it, rewrite the table."""

import argparse
import copy
import json
import sys
from pathlib import Path

import search_bench as sb
import torch

from secateur.export import tokenizer_gguf_for
from secateur.graph.plan import Plan
from secateur.recipe.load import load_recipe
from secateur.search_cmd import search_problem, sequential_compiler

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(2)
goal, sampler, recipe_path = sys.argv[1], sys.argv[2], sys.argv[3]
out = REPO / "bench" / "results" / "search"
doc = json.loads(out.with_suffix(".json").read_text())
row = next(r for r in doc["rows"] if sb._group(r)[0] == goal and r["sampler"] == sampler)
asked = load_recipe(recipe_path, ["model.dtype=float32", "model.device=cpu"])
p = search_problem(asked, Path(recipe_path).resolve().parent, print)
m = copy.deepcopy(p.lm.model)
sequential_compiler(p.recipe, p.lm, p.calib)(m, Plan.from_dict(row["plan"]))
res = sb.speed_row(p.lm, m, tokenizer_gguf_for(p.lm.source, None, "speed"), 10)
print(json.dumps(res["speed"]), flush=True)
row.update(res)
row["speed_retimed"] = "re-timed alone by bench/search_retime.py (first timing overlapped another job)"
args = argparse.Namespace(out=str(out), eval_dtype="bfloat16", limit=200, model="smollm2-135m")
sb.write(args, doc["rows"], doc["config"])
