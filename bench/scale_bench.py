"""Benchmark: peak RSS against model size, in memory and streaming (model.stream: true).

Not a test. Each row is one `secateur prune` in its own process (so its peak RSS is its own),
FASP on the MLP channels with least-squares restoration; the figures come from the run's
report.json. Writes bench/results/scale.md (+ .json) with the command and machine.

Models: `smollm2-135m` (the real GGUF) and random-weight Qwen2 models of a real model's shapes
(`qwen2-7b-shape`: DeepSeek-R1-Distill-Qwen-7B's hidden size, MLP width, heads and vocabulary;
`qwen2-7b-shape-2l`: the same at depth 2),
written by this script as sharded bf16 safetensors into --work (outside the repository). Random
weights measure memory and time only: their perplexity means nothing and is not reported.

    python bench/scale_bench.py --work /work/scale-work --rows smollm2:memory smollm2:stream
    python bench/scale_bench.py --work /work/scale-work --rows qwen2-7b-shape-2l:stream qwen2-7b-shape-2l:memory --append
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _results import earlier_results, machine, write_results

REPO = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    # DeepSeek-R1-Distill-Qwen-7B (qwen2): read from its GGUF header
    "qwen2-7b-shape": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    ),
}
# the same layers, embeddings and head at depth 2: streaming's peak does not depend on depth
SHAPES["qwen2-7b-shape-2l"] = dict(SHAPES["qwen2-7b-shape"], num_hidden_layers=2)
# a random 1.1B Llama (TinyLlama's layer shapes at 16 layers, the vocabulary of SmolLM2's tokenizer,
# which the prune tokenizes its calibration text with), pruned from a float32 recipe
SHAPES["llama-1.1b-shape"] = dict(
    model_type="llama",
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=49152,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
FLOAT32_RECIPES = {"llama-1.1b-shape"}  # the rest prune in bfloat16, as their weights are stored


def make_synthetic(folder: Path, shape: str, layers: int | None = None) -> Path:
    """A random-weight Qwen2 folder of `shape`, written one layer per shard (never whole in memory)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from secateur.runtime.store.loader import resolve_source

    cfg = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    model_type = cfg.pop("model_type", "qwen2")
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(model_type, **cfg)
    config.dtype = torch.bfloat16
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in model.named_parameters()]
    n_layers = config.num_hidden_layers
    groups = [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(n_layers)]
    groups.append([n for n in names if not n.startswith("model.layers.")])
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, group in enumerate(groups, 1):
        shard = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            p = model.get_parameter(n)
            if p.dim() == 1 and "norm" in n:
                tensors[n] = torch.ones(p.shape, dtype=torch.bfloat16)
            else:  # row blocks: never a float32 copy of a whole embedding
                t = torch.empty(p.shape, dtype=torch.bfloat16)
                for r in range(0, p.shape[0], 4096):
                    block = torch.randn((min(4096, p.shape[0] - r), *p.shape[1:]), generator=gen) * 0.02
                    t[r : r + block.shape[0]] = block.to(torch.bfloat16)
                tensors[n] = t
            weight_map[n] = shard
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        print(f"  {shape}: shard {k}/{len(groups)}", flush=True)
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(str(tmp))
    src = resolve_source("smollm2-135m")  # any tokenizer whose ids fit the vocabulary
    AutoTokenizer.from_pretrained(src.path, **src.kwargs()).save_pretrained(str(tmp))
    os.replace(tmp, folder)
    return folder


def recipe_for(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    real = model == "smollm2"
    return {
        "version": 1,
        "name": f"scale-{model}-{mode}",
        "model": {
            "id": "smollm2-135m" if real else str(Path(args.work) / model),
            "dtype": "float32" if real or model in FLOAT32_RECIPES else "bfloat16",
            "device": "cpu",
            "stream": mode == "stream",
        },
        "calibration": {
            "dataset": "wikitext2",
            "split": "validation",
            "n_samples": args.n_samples,
            "seqlen": args.seqlen,
            "data_root": args.data_root,
        },
        "targets": {"mlp": True, "attention": "none"},
        "budget": {"params": 0.2, "multiple_of": 64},
        "restore": {"method": "least_squares"},
        "evaluate": {
            "enabled": real,
            "perplexity": [{"dataset": "wikitext2", "split": "test", "seqlen": 512, "max_windows": 2}],
            "latency": {"prefill_len": 32, "decode_tokens": 4, "repeats": 1},
        },
    }


def run_row(model: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One prune in a fresh process; its report.json's figures."""
    if model != "smollm2":
        make_synthetic(Path(args.work) / model, model)
    work = Path(args.work)
    rec = work / f"scale-{model}-{mode}.yaml"
    rec.write_text(yaml.safe_dump(recipe_for(model, mode, args)))
    out = work / "runs" / f"{model}-{mode}"
    cmd = [sys.executable, "-m", "secateur.cli", "prune", str(rec), "-o", str(out), "--overwrite", "--quiet"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    rep = json.loads((out / "report.json").read_text())
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {
        "model": model,
        "mode": mode,
        "params": rep["size"]["dense"]["params"],
        "dtype": rep["dtype"],
        "peak_rss_gib": rep["memory"]["peak_rss_bytes"] / 2**30,
        "bound_gib": {k: v / 2**30 for k, v in rep.get("stream", {}).get("memory_bound_bytes", {}).items()},
        "phases": rep["phases"],
        "perplexity": rep.get("perplexity"),
        "wall_s": wall,
        "output_weights_gib": weights / 2**30,
        "calibration": f"{args.n_samples} x {args.seqlen}",
    }


def table(rows: list[dict[str, Any]], command: str) -> list[str]:
    lines = [
        "# Peak memory against model size: in memory vs streaming",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine()}. FASP, MLP channels, 20% of decoder linear parameters, least-squares restoration.",
        "Peak RSS is the pruning process's own (VmHWM). Streaming bound (`runtime.store.stream.memory_bound`) = "
        "2 x largest layer + embeddings, norm and head as the decoder pass holds them (read in place from a "
        "safetensors file in the working dtype: the calibration tokens' rows) + calibration activations (layer "
        "inputs and outputs) + fp32 Gram matrices of the consumers + the restoration's workspace + what writing "
        "and perplexity add after the pass + 1 GiB runtime allowance; the column lists the first four terms.",
        "",
        "| model | params | dtype | mode | calibration | peak RSS GiB | streaming bound GiB "
        "(2xlayer + resident + acts + stats) | peak - bound GiB | load s | capture s | statistics s | "
        "restoration s | forward s | total wall s | perplexity dense -> pruned |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["bound_gib"]
        bound = (
            f"{b['total']:.2f} ({b['layer_x2']:.2f} + {b['resident']:.2f} + {b['activations']:.2f} + "
            f"{b['statistics']:.2f})"
            if b
            else "-"
        )
        extra = f"{r['peak_rss_gib'] - b['total']:.2f}" if b else "-"
        ph = r["phases"]
        ppl = "-"
        if r["perplexity"]:
            d, p = r["perplexity"]["dense"], r["perplexity"]["pruned"]
            ppl = ", ".join(f"{k}: {d[k]:.2f} -> {p[k]:.2f}" for k in d)
        lines.append(
            f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['dtype']} | {r['mode']} | {r['calibration']} | "
            f"{r['peak_rss_gib']:.2f} | {bound} | {extra} | {ph.get('load', 0):.1f} | {ph.get('capture', 0):.1f} | "
            f"{ph.get('statistics', 0):.1f} | {ph.get('restoration', 0):.1f} | {ph.get('forward', 0):.1f} | "
            f"{r['wall_s']:.0f} | {ppl} |"
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True, help="folder outside the repository for models and runs")
    ap.add_argument("--rows", nargs="+", default=["smollm2:memory", "smollm2:stream"], help="MODEL:MODE")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in OUT.json")
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if Path(args.work).resolve().is_relative_to(REPO):
        raise SystemExit(f"--work {args.work} is inside the repository; put models elsewhere")
    rows = earlier_results(args.out, args.append, {"rows": []})["rows"]
    command = "python bench/scale_bench.py " + " ".join(sys.argv[1:])
    for spec in args.rows:
        model, mode = spec.split(":")
        rows = [r for r in rows if (r["model"], r["mode"]) != (model, mode)]
        rows.append(run_row(model, mode, args))
        write_results(args.out, {"command": command, "rows": rows}, table(rows, command))


if __name__ == "__main__":
    main()
