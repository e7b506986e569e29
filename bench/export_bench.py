"""Benchmark: pruned SmolLM2 outputs exported to GGUF and run in llama.cpp (llama-cpp-python).

Not a test. Two tables, each with its command and machine:

- `ppl`: llama.cpp's perplexity, from its own logits on the same WikiText-2 test token ids as
  Secateur's PyTorch evaluation, per out type, and the relative difference
  (bench/results/export-ppl.md).
- `speed`: llama.cpp prefill and decode tokens/s of the dense model and each pruned one, measured
  alternately in one process, with the FLOPs ratio and the realised fraction
  (speedup - 1) / (FLOPs ratio - 1) (bench/results/export.md).

    python bench/export_bench.py ppl RUN_DIR... --workdir /tmp/export-bench
    python bench/export_bench.py speed RUN_DIR... --workdir /tmp/export-bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from _results import earlier_results, machine, write_results

from secateur.export import export_model, source_of, tokenizer_gguf_for
from secateur.graph.count import decoder_linear_params, flops_per_token
from secateur.runtime.export import llamacpp as lc
from secateur.runtime.export.decilm import read_decilm, write_decilm
from secateur.runtime.export.gguf import gguf_layout
from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
from secateur.runtime.store.loader import LoadedModel, load_model


def _load(ref: str) -> LoadedModel:
    return load_model(ref, dtype="float32", device="cpu")


def _gguf(lm: LoadedModel, tok: Path, name: str, outtype: str, workdir: Path) -> Path:
    """Export once per (model, out type) into the work folder (reused on a rerun)."""
    out = workdir / f"{name}-{outtype}.gguf"
    if not out.is_file():
        export_model(lm.model, lm.adapter, "gguf", out, outtype=outtype, tokenizer_gguf=tok, name=name)
    return out


def _models(runs: list[str], skip: set[str] = frozenset()) -> tuple[Path, list[tuple[str, LoadedModel]]]:
    """The dense source model (recorded by the first run's lock) and every pruned run."""
    src = source_of(Path(runs[0]))
    tok = tokenizer_gguf_for(src, None, runs[0])
    models = [] if "dense" in skip else [("dense", _load(src.ref if src else "smollm2-135m"))]
    models += [(Path(r).name, _load(r)) for r in runs if Path(r).name not in skip]
    return tok, models


def _kept_rows(args: argparse.Namespace, default: str) -> list[dict]:
    """--append: the rows an earlier run of the same table measured (their models are not redone)."""
    return earlier_results(args.out or default, args.append, {"rows": []})["rows"]


def ppl(args: argparse.Namespace) -> None:
    rows = _kept_rows(args, "bench/results/export-ppl")
    done = {r["model"] for r in rows}
    tok, models = _models(args.runs, skip=done)
    text = load_text("wikitext2", "test")
    for name, lm in models:
        windows = eval_windows(tokenize_text(lm.tokenizer, text), args.seqlen, args.windows)
        row = {
            "model": name,
            "arch": gguf_layout(lm.model, lm.adapter).arch,
            "torch": perplexity(lm.model, windows),
        }
        for ot in args.outtypes:
            row[ot] = lc.perplexity(_gguf(lm, tok, name, ot, args.workdir), windows, threads=args.threads)
        if args.decilm:  # the DeciLM checkpoint read back as vLLM reads block_configs (vLLM itself not run)
            folder = args.workdir / f"{name}-decilm"
            if not folder.is_dir():
                write_decilm(lm.model, lm.adapter, folder, dtype="f32")
            row["decilm"] = perplexity(read_decilm(folder), windows)
        rows.append(row)
        print(row, flush=True)
    lines = [
        "# GGUF exports in llama.cpp: perplexity agreement with Secateur's PyTorch evaluation",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}; llama-cpp-python {_llama_version()}  ",
        f"Perplexity: the first {args.windows} non-overlapping {args.seqlen}-token windows of WikiText-2 test, "
        "the same token ids in both; llama.cpp's logits for every position (logits_all). PyTorch in float32.",
        "",
        "| model | llama.cpp arch | PyTorch ppl | "
        + " | ".join(f"llama.cpp {o} | diff {o}" for o in args.outtypes)
        + (" | DeciLM read back | diff |" if args.decilm else " |"),
        "|---|---|---|" + "---|---|" * (len(args.outtypes) + bool(args.decilm)),
    ]
    for r in rows:
        cells = [
            f"{r[o]:.3f} | {r[o] / r['torch'] - 1:+.3%}" if o in r else "- | -"
            for o in args.outtypes + (["decilm"] if args.decilm else [])
        ]
        lines.append(f"| {r['model']} | {r['arch']} | {r['torch']:.3f} | " + " | ".join(cells) + " |")
    write_results(
        args.out or "bench/results/export-ppl",
        {"rows": rows, "args": vars(args) | {"workdir": str(args.workdir)}},
        lines,
    )


def _flops(lm: LoadedModel, prefill: int, decode: int) -> tuple[float, float]:
    """FLOPs per token as llama.cpp spends them: a prefill computes the LM head for its last position
    only, attending to prefill/2 positions on average; a decode step computes it every token."""
    head = 2 * lm.model.get_output_embeddings().weight.numel()
    pre = flops_per_token(lm.model, lm.adapter, prefill // 2) - head + head / prefill
    dec = flops_per_token(lm.model, lm.adapter, prefill + decode // 2)
    return pre, dec


def speed(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tok, models = _models(args.runs)
    text_ids = tokenize_text(models[0][1].tokenizer, load_text("wikitext2", "test")).reshape(-1)
    ids = text_ids[: args.prefill + args.decode].tolist()
    prompt, steps = ids[: args.prefill], ids[args.prefill :]
    files = {name: _gguf(lm, tok, name, args.outtype, args.workdir) for name, lm in models}
    meas: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in models}
    ctx = args.prefill + args.decode + 8
    # each round opens (in a child process), warms up and measures every model in turn
    for rep in range(args.repeats):
        for name, _ in models:
            with lc.open_gguf(files[name], ctx, args.threads, all_logits=False) as llm:
                lc.speed(llm, prompt[:32], steps[:2])  # warm-up: weights paged in, threads started
                meas[name].append(lc.speed(llm, prompt, steps))
        print(f"repeat {rep + 1}/{args.repeats}", {n: m[-1] for n, m in meas.items()}, flush=True)
    dense = next(lm for name, lm in models if name == "dense")
    d_pre, d_dec = _flops(dense, args.prefill, args.decode)
    d_lin = decoder_linear_params(dense.model, dense.adapter)
    rows = []
    for name, lm in models:
        p, d = (statistics.median(x[k] for x in meas[name]) for k in (0, 1))
        f_pre, f_dec = _flops(lm, args.prefill, args.decode)
        rows.append(
            {
                "model": name,
                "arch": gguf_layout(lm.model, lm.adapter).arch,
                "removed": 1 - decoder_linear_params(lm.model, lm.adapter) / d_lin,
                "prefill_tok_s": p,
                "decode_tok_s": d,
                "prefill_flops_ratio": d_pre / f_pre,
                "decode_flops_ratio": d_dec / f_dec,
                "spread": {
                    k: (max(x[i] for x in meas[name]) - min(x[i] for x in meas[name])) / (p if i == 0 else d)
                    for i, k in enumerate(("prefill", "decode"))
                },
            }
        )
    base = rows[0]
    lines = [
        "# Pruned SmolLM2 in llama.cpp: prefill and decode speed, dense vs pruned",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Machine: {machine()}; llama-cpp-python {_llama_version()}, {args.threads} llama.cpp threads  ",
        f"GGUF weights {args.outtype} (norms f32). Prompt: the first {args.prefill} tokens of WikiText-2 test, then "
        f"{args.decode} one-token decode steps over the next tokens; every model is measured once per round, "
        f"rounds alternate models in one process, medians of {args.repeats} rounds. FLOPs per token count the "
        "LM head as llama.cpp runs it (last position of a prefill, every decode step) and attention at the "
        "mean context. Realised = (speedup - 1) / (FLOPs ratio - 1).",
        "",
        "| model | arch | removed | prefill tok/s | speedup | FLOPs ratio | realised | decode tok/s | speedup | FLOPs ratio | realised | spread p/d |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp, sd = r["prefill_tok_s"] / base["prefill_tok_s"], r["decode_tok_s"] / base["decode_tok_s"]
        real = [
            (s - 1) / (f - 1) if f > 1.0001 else float("nan")
            for s, f in ((sp, r["prefill_flops_ratio"]), (sd, r["decode_flops_ratio"]))
        ]
        r.update(prefill_speedup=sp, decode_speedup=sd, prefill_realised=real[0], decode_realised=real[1])
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['removed']:.1%} | {r['prefill_tok_s']:.1f} | {sp:.3f} | "
            f"{r['prefill_flops_ratio']:.3f} | {real[0]:.2f} | {r['decode_tok_s']:.1f} | {sd:.3f} | "
            f"{r['decode_flops_ratio']:.3f} | {real[1]:.2f} | {r['spread']['prefill']:.0%}/{r['spread']['decode']:.0%} |"
        )
    write_results(
        args.out or "bench/results/export",
        {"rows": rows, "args": vars(args) | {"workdir": str(args.workdir)}},
        lines,
    )


def _llama_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("ppl", ppl), ("speed", speed)):
        p = sub.add_parser(name)
        p.add_argument("runs", nargs="+", help="pruned output folders of the same source model")
        p.add_argument("--workdir", type=Path, required=True, help="where the GGUF files go")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", default=None)
        p.set_defaults(func=fn)
        if name == "ppl":
            p.add_argument("--windows", type=int, default=4)
            p.add_argument("--seqlen", type=int, default=512)
            p.add_argument("--outtypes", nargs="+", default=["f32", "f16"])
            p.add_argument("--append", action="store_true", help="keep the rows already in the table")
            p.add_argument(
                "--decilm", action="store_true", help="also the DeciLM checkpoint, read back in PyTorch"
            )
        else:
            p.add_argument("--outtype", default="f16")
            p.add_argument("--prefill", type=int, default=256)
            p.add_argument("--decode", type=int, default=32)
            p.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    reason = lc.available()
    if reason:
        sys.exit(f"export_bench: {reason}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    args.func(args)


if __name__ == "__main__":
    main()
