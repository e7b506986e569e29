"""Speed where models are served: pruned MLP widths at several `multiple_of` steps, timed in
llama.cpp (f16, q8_0) and PyTorch (fp32) on random-weight models of real shapes, with the FLOPs
ratio, the realised share of it, the spread, and the latency model's prediction beside each.

Latency does not depend on weight values, so every model here is a probe (runtime/speed/probe.py):
a uniform Llama of the real hidden size, heads, vocabulary and depth, its MLP cut to the width a
uniform plan removing the budget gives at that `multiple_of`. Each engine times dense and all
pruned widths alternately, round by round (runtime/speed/measure.py: medians, interquartile spread,
busy rounds repeated).

    python bench/speed_bench.py --shape tinyllama-1.1b --budgets 0.3 --steps 8 32 128 auto
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_results  # noqa: E402

from secateur.graph.plan import round_keep  # noqa: E402
from secateur.runtime.speed.engines import GGUFTimer, default_threads, engine_version, time_torch  # noqa: E402
from secateur.runtime.speed.latency import LatencyModel  # noqa: E402
from secateur.runtime.speed.measure import Target, measure_alternating  # noqa: E402
from secateur.runtime.speed.probe import ProbeShape, probe_torch_model, write_probe_gguf  # noqa: E402
from secateur.runtime.speed.width import auto_multiple_of  # noqa: E402

SHAPES = {
    # SmolLM2-135M: 30 layers, hidden 576, 9 heads / 3 KV, MLP 1536, vocab 49152
    "smollm2-135m": (ProbeShape(576, 9, 3, 64, 1536, 49152), 30),
    # TinyLlama-1.1B shapes (the random 1.1B Llama): hidden 2048, MLP 5632, 16 layers as issue 25
    "tinyllama-1.1b": (ProbeShape(2048, 32, 4, 64, 5632, 32000), 16),
    # Qwen2-7B widths (hidden 3584, 28 heads / 4 KV, MLP 18944, vocab 152064), depth cut to 4 layers
    "qwen2-7b-d4": (ProbeShape(3584, 28, 4, 128, 18944, 152064), 4),
}


def mlp_width(shape: ProbeShape, budget: float, step: int) -> int:
    """The uniform MLP width removing `budget` of the decoder's linear parameters from the MLPs."""
    h = shape.hidden
    attn = 2 * h * shape.n_head * shape.head_dim + 2 * h * shape.n_kv * shape.head_dim
    mlp = 3 * h * shape.n_ff
    remove = budget * (attn + mlp)
    return round_keep(shape.n_ff - remove / (3 * h), shape.n_ff, step, 1)


def flops(shape: ProbeShape, layers: int, prefill: int, decode: int) -> tuple[float, float]:
    """FLOPs per token as served (runtime graph.count.served_flops' formula, from shapes alone)."""
    h, q, kv, d = shape.hidden, shape.n_head, shape.n_kv, shape.head_dim
    lin = 2 * (2 * h * q * d + 2 * h * kv * d + 3 * h * shape.n_ff)
    head = 2 * h * shape.vocab

    def attn(ctx: int) -> float:
        return 4 * q * d * ctx

    pre = layers * (lin + attn(prefill // 2)) + head / prefill
    dec = layers * (lin + attn(prefill + decode // 2)) + head
    return pre, dec


def run(args: argparse.Namespace) -> None:
    dense0, depth = SHAPES[args.shape]
    dense = dense0.with_(n_layers=depth)
    threads = args.threads or default_threads()
    rows = []
    for engine, wtype in args.engines:
        target = Target(engine, "cpu", wtype, None, threads, args.prefill, args.decode, rounds=7)
        if wtype in ("q8_0", "q4_0"):
            target = Target(engine, "cpu", "f16", wtype, threads, args.prefill, args.decode, rounds=7)
        t0 = time.perf_counter()
        sweep = auto_multiple_of(target, dense0, print)
        sweep_s = time.perf_counter() - t0
        models = {"dense": dense}
        for b in args.budgets:
            for st in args.steps:
                m = sweep.multiple_of if st == "auto" else max(int(st), sweep.block)
                w = mlp_width(dense0, b, m)
                models.setdefault(f"{b:.0%} step {st}", dense.with_(n_ff=w))
        print(f"{engine} {wtype}: {len(models)} models, sweep {sweep.describe()} in {sweep_s:.0f} s")
        with tempfile.TemporaryDirectory(prefix="speed-bench-") as tmp:
            timers = {}
            for name, s in models.items():
                if engine == "llama.cpp":
                    path = Path(tmp) / f"{abs(hash(name))}.gguf"
                    write_probe_gguf(s, path, target.weight_type)
                    ids = [3 + (i * 7919) % (s.vocab - 3) for i in range(args.prefill + args.decode)]
                    timers[name] = GGUFTimer(path, ids[: args.prefill], ids[args.prefill :], threads)
                else:
                    model = probe_torch_model(s, getattr(torch, wtype))
                    timers[name] = lambda m_=model: time_torch(m_, args.prefill, args.decode, threads)
            res = measure_alternating(timers, args.rounds, print)
        lat = LatencyModel.build(target, dense0, sweep.multiple_of, 0.05, print) if args.predict else None
        fd = flops(dense0, depth, args.prefill, args.decode)
        for name, s in models.items():
            f = flops(s.with_(n_layers=1), depth, args.prefill, args.decode)
            row = {
                "shape": args.shape,
                "engine": f"{engine} {wtype}",
                "model": name,
                "width": s.n_ff,
                "multiple_of_auto": sweep.multiple_of,
                "busy": res[name].busy,
            }
            for j, ph in enumerate(("prefill", "decode")):
                n = args.prefill if ph == "prefill" else args.decode
                sp = res["dense"].phase(ph) / res[name].phase(ph)
                fr = fd[j] / f[j]
                row[f"{ph}_tok_s"] = n / res[name].phase(ph)
                row[f"{ph}_speedup"] = sp
                row[f"{ph}_flops_ratio"] = fr
                row[f"{ph}_realised"] = (sp - 1) / (fr - 1) if fr > 1.0001 else math.nan
                row[f"{ph}_spread"] = getattr(res[name], f"{ph}_spread")
                if lat is not None:
                    shapes = [
                        {"num_heads": s.n_head, "num_kv_heads": s.n_kv, "intermediate_size": s.n_ff}
                    ] * depth
                    row[f"{ph}_predicted_s"] = lat.predict(shapes)[ph]
                    row[f"{ph}_measured_s"] = res[name].phase(ph)
            rows.append(row)
            print(row)
    header = (
        f"# Speed where it is served: {args.shape} (random weights, real shapes)\n\n"
        f"Command: `python bench/speed_bench.py {' '.join(sys.argv[1:])}`  \n"
        f"Machine: {platform.machine()}, {threads} threads, {torch.__version__}, "
        f"{engine_version('llama.cpp') if any(e == 'llama.cpp' for e, _ in args.engines) else ''}  \n"
        f"Prefill {args.prefill} tokens in one batch, then {args.decode} one-token decode steps with the KV "
        f"cache; medians of {args.rounds} alternating rounds (dense and every width each round). Realised = "
        f"(speedup - 1) / (FLOPs ratio - 1); spread = interquartile range / median.\n"
    )
    lines = [
        header,
        "| engine | model | width | prefill tok/s | x | FLOPs x | realised | decode tok/s | x | FLOPs x | realised | spread p/d | predicted/measured p/d |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        pm = (
            f"{r['prefill_predicted_s'] / r['prefill_measured_s']:.2f}/{r['decode_predicted_s'] / r['decode_measured_s']:.2f}"
            if "prefill_predicted_s" in r
            else "-"
        )
        lines.append(
            f"| {r['engine']} | {r['model']} | {r['width']} | {r['prefill_tok_s']:.1f} | {r['prefill_speedup']:.3f} | "
            f"{r['prefill_flops_ratio']:.3f} | {r['prefill_realised']:.2f} | {r['decode_tok_s']:.2f} | "
            f"{r['decode_speedup']:.3f} | {r['decode_flops_ratio']:.3f} | {r['decode_realised']:.2f} | "
            f"{(r['prefill_spread'] or 0):.0%}/{(r['decode_spread'] or 0):.0%}{' busy' if r['busy'] else ''} | {pm} |"
        )
    out = Path(args.out or f"bench/results/speed-{args.shape.replace('.', '_')}")
    write_results(out, rows, lines)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="smollm2-135m")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    p.add_argument("--steps", nargs="+", default=["8", "32", "64", "128", "auto"])
    p.add_argument(
        "--engines",
        nargs="+",
        default=["llama.cpp:f16", "llama.cpp:q8_0", "torch:float32"],
        help="ENGINE:TYPE pairs",
    )
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int)
    p.add_argument("--predict", action="store_true", help="also the latency model's prediction per model")
    p.add_argument("--out")
    args = p.parse_args()
    args.engines = [tuple(e.split(":", 1)) for e in args.engines]
    run(args)


if __name__ == "__main__":
    main()
