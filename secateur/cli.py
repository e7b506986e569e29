"""The `secateur` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

# Each subcommand imports what it runs inside its function, on purpose: the prune pipeline pulls
# in transformers' Trainer, peft and datasets (healing), the search optuna and sqlalchemy, and
# together they take seconds to import, which `secateur --help`, `graph` or `report` should not pay.
# (`clean` is the exception: the standard library only, and main() sweeps leftovers before every command)
from secateur import clean

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class CliError(Exception):
    """An error reported to the user as one clear line, exit code 2."""


def _graph(args: argparse.Namespace) -> int:
    from secateur.graph.build import build_graph, summarize
    from secateur.runtime.store.loader import load_model

    lm = load_model(args.model, dtype="float32", device="cpu", tokenizer=False)
    summary = summarize(build_graph(lm.model, lm.adapter), lm.model)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(
        f"model_type: {summary['model_type']}   layers: {summary['num_layers']}   "
        f"parameters: {summary['total_params']:,}"
    )
    print(
        f"{'unit kind':<14} {'units/layer':>12} {'params/unit':>12} {'total units':>12} {'total params':>14}"
    )
    for kind, k in summary["kinds"].items():
        upl = sorted(set(k["units_per_layer"].values()))
        ppu = sorted(set(k["params_per_unit"].values()))
        fmt = lambda v: str(v[0]) if len(v) == 1 else f"{v[0]}..{v[-1]}"  # noqa: E731
        print(f"{kind:<14} {fmt(upl):>12} {fmt(ppu):>12} {k['total_units']:>12,} {k['total_params']:>14,}")
    for name, others in summary["coupling_examples"].items():
        print(f"{name} is coupled with: {', '.join(others)}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from secateur.api import prune
    from secateur.summary import format_summary

    if (args.recipe is None) == (args.lock is None):
        raise CliError("give either a RECIPE or --lock LOCK")
    recipe = args.recipe
    if args.pick is not None:
        from secateur.pick import picked_recipe

        if args.lock is not None:
            raise CliError("--pick compiles a front point of a search folder; it takes no --lock")
        recipe, point = picked_recipe(args.recipe, args.pick)
        print(f"picked front point: trial {point['trial']} -> {recipe}")
    out = prune(
        recipe,
        output=args.output,
        overwrite=args.overwrite,
        overrides=args.set or (),
        lock_path=args.lock,
        progress=not args.quiet,
        stream=args.stream,
    )
    print(format_summary(out.report))
    if out.reproduced is not None:
        print(
            f"lock reproduced: {'bit-identical weights' if out.reproduced else 'weights DIFFER from the lock'}"
        )
    saved_as = out.report.get("output_dtype")
    print(f"saved to {out.output}" + (f" ({saved_as})" if saved_as else ""))
    return 0 if out.reproduced in (None, True) else 1


def _recipe(args: argparse.Namespace) -> int:
    import yaml

    from secateur.recipe.load import dump_recipe, load_recipe, recipe_json_schema, validate_file

    if args.action == "schema":
        print(json.dumps(recipe_json_schema(), indent=2))
        return 0
    if args.recipe is None:
        raise CliError(f"recipe {args.action}: RECIPE is required")
    if args.action == "validate":
        issues = validate_file(args.recipe, args.set or ())
        for issue in issues:
            print(issue, file=sys.stderr)
        if issues:
            print(f"{len(issues)} error(s) in {args.recipe}", file=sys.stderr)
            return 1
        print(f"{args.recipe}: valid")
        return 0
    recipe = load_recipe(args.recipe, args.set or ())
    if args.action == "show":
        print(dump_recipe(recipe), end="")
        return 0
    from secateur.explain import explain, format_explanation

    ex = explain(recipe, args.model, latency=args.latency, log=None if args.json else print)
    if args.json:
        print(
            yaml.safe_dump(
                {
                    "plans": [pl.to_dict() for pl in ex.plans],
                    "stages": ex.stages,
                    "totals": ex.totals,
                    "exports": ex.exports,
                    "stream_memory_bytes": ex.stream,
                    "serving": ex.serving,
                    "latency": ex.latency,
                },
                sort_keys=False,
            )
        )
    else:
        print(format_explanation(ex))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from secateur.evaluation import wikitext_perplexity
    from secateur.runtime.measure.timing import memory_lines, peak_memory
    from secateur.runtime.measure.zeroshot import LOCAL_TASKS, TASKS_DIR, check_tasks, run_zeroshot
    from secateur.runtime.store.data import default_data_root
    from secateur.runtime.store.loader import load_model

    if args.tasks_path:
        print(TASKS_DIR)
        return 0
    if args.path is None:
        raise CliError("PATH is required (or --tasks-path)")
    require_positive(args, "limit", "ppl_seqlen", "ppl_windows", "batch_size")
    tasks = [t for t in (args.tasks or "").split(",") if t] if args.tasks is not None else list(LOCAL_TASKS)
    if args.stream and args.tasks is None:
        tasks = []  # zero-shot tasks need the whole model; streaming evaluates perplexity only
    if args.stream and tasks:
        raise CliError(
            "--stream evaluates perplexity only: zero-shot tasks need the whole model (drop --tasks)"
        )
    if not tasks and not args.ppl_seqlen:
        raise CliError("nothing to evaluate: --tasks '' asks for perplexity only; give --ppl-seqlen L")
    root = args.data_root or default_data_root()
    if tasks:  # `--tasks ""`: perplexity only
        check_tasks(tasks, root)
    lm = load_model(args.path, args.dtype, args.device, stream=args.stream)
    if args.ppl_seqlen:
        print(wikitext_perplexity(lm, args.path, args.ppl_seqlen, args.ppl_windows, root))
    if tasks:
        res = run_zeroshot(lm.model, lm.tokenizer, tasks, root, args.limit, args.batch_size)
        nan = float("nan")

        def cell(m: dict, key: str) -> str:
            err = m.get(f"{key}_stderr")
            return f"{m.get(key, nan):.4f}" + (f" +-{err:.4f}" if err is not None else "")

        print(f"{'task':<16} {'acc (+- stderr)':>18} {'acc_norm (+- stderr)':>22}")
        for task, m in res.items():
            print(f"{task:<16} {cell(m, 'acc'):>18} {cell(m, 'acc_norm'):>22}")
        if args.limit is not None:
            print(
                f"note: --limit {args.limit} scores only the first {args.limit} documents of each task: a smoke "
                f"test, not a benchmark figure (compare models only on the same full sets)"
            )
        if args.json:
            print(json.dumps(res, indent=2))
    for line in memory_lines(peak_memory(lm.device)):
        print(line)
    return 0


def _search(args: argparse.Namespace) -> int:
    from secateur.runtime.measure.timing import memory_lines
    from secateur.search.errors import SearchError
    from secateur.search_cmd import search

    try:
        res = search(
            args.recipe,
            trials=args.trials,
            storage=args.storage,
            output=args.output,
            workers=args.workers,
            overrides=tuple(args.set or ()),
            compile_model=args.compile,
            validate=not args.no_validate,
            progress=not args.quiet,
        )
    except SearchError as e:  # storage, mismatched study, failed workers: one line, not a traceback
        raise CliError(str(e)) from e
    s = res.summary
    print(
        f"best trial {s['best_trial']}: {s['best_value']:.4f} (uniform {s['uniform_value']}); "
        f"{s['trials']} trials in storage {s['storage']}"
    )
    print(f"winner recipe: {res.winner_recipe}")
    for p in s["plots"]:
        print(f"plot: {p}")
    if "validation" in s:
        from secateur.search_validate import validation_table

        print(f"winner vs uniform on the recipe's evaluate sets ({s['validation_table']}):")
        print(validation_table(s["validation"]))
    if "model" in s:
        print(f"compiled model: {s['model']}")
    for line in memory_lines(s["memory"]):
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    from secateur.export import export

    out = export(
        args.run_dir,
        args.format,
        outtype=args.outtype,
        output=args.output,
        tokenizer_gguf=args.tokenizer_gguf,
        overwrite=args.overwrite,
        stream=args.stream,
    )
    print(f"exported {args.format} ({args.outtype}) to {out}")
    return 0


def require_positive(args: argparse.Namespace, *flags: str) -> None:
    """Count-like options given on the command line are at least 1."""
    for flag in flags:
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise CliError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")


def _speed(args: argparse.Namespace) -> int:
    import json

    from secateur.runtime.speed.engines import EngineUnavailable
    from secateur.runtime.speed.table import format_speed
    from secateur.speed import run_speed

    require_positive(args, "rounds", "prefill", "decode", "threads")
    try:
        table = run_speed(
            args.run_dir,
            engine=args.engine,
            rounds=args.rounds,
            prefill=args.prefill,
            decode=args.decode,
            threads=args.threads,
            outtype=args.outtype,
            tokenizer_gguf=args.tokenizer_gguf,
            log=None if args.json else print,
        )
    except EngineUnavailable as e:  # no llama-cpp-python, or llama.cpp crashed in its child process
        raise CliError(str(e)) from e
    print(json.dumps(table, indent=1) if args.json else format_speed(table))
    return 0


def _report(args: argparse.Namespace) -> int:
    from secateur.runtime.measure.report import read_report

    print(read_report(args.dir))
    return 0


def _graph_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("graph", help="print the coupled groups of a model")
    g.add_argument("model", help="short name (smollm2-135m), local folder, .gguf file or hub id")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_graph)


def _prune_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("prune", help="prune a model with a recipe (or re-apply a lock)")
    pr.add_argument("recipe", nargs="?", help="recipe YAML")
    pr.add_argument("--output", "-o", help="output directory (default: the recipe's output.dir)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    pr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    pr.add_argument("--lock", help="re-apply a recipe.lock.yaml instead of a recipe")
    pr.add_argument(
        "--pick",
        metavar="latency=X|params=X",
        help="RECIPE is a Pareto search folder: compile its front point with the lowest proxy that is "
        "predicted at most X of dense time (latency) or removes at least X of the parameters (params)",
    )
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    pr.add_argument(
        "--stream",
        action="store_true",
        help="read and write one decoder layer at a time (model.stream: true)",
    )
    pr.set_defaults(func=_prune)


def _recipe_parser(sub: argparse._SubParsersAction) -> None:
    rc = sub.add_parser("recipe", help="schema | validate | show | explain")
    rc.add_argument("action", choices=["schema", "validate", "show", "explain"])
    rc.add_argument("recipe", nargs="?")
    rc.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    rc.add_argument("--model", help="explain against another model than the recipe's")
    rc.add_argument("--json", action="store_true", help="explain: machine-readable plan")
    rc.add_argument(
        "--latency",
        action="store_true",
        help="explain: predicted per-layer latency on the recipe's target (measured, cached)",
    )
    rc.set_defaults(func=_recipe)


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="zero-shot accuracy (lm-eval, local data) and perplexity of a model")
    ev.add_argument("path", nargs="?", help="a pruned output folder or any model the loader accepts")
    ev.add_argument("--tasks", help="comma-separated tasks (default: the six local ones; '' for none)")
    ev.add_argument("--limit", type=int, help="evaluate only the first N examples of each task")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument(
        "--ppl-seqlen", type=int, default=None, help="also WikiText-2 test perplexity at this seqlen"
    )
    ev.add_argument("--ppl-windows", type=int, default=None, help="first N perplexity windows only")
    ev.add_argument("--data-root", help="folder with wikitext2/ and zeroshot/ (default: SECATEUR_DATA_ROOT)")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--json", action="store_true")
    ev.add_argument(
        "--tasks-path",
        action="store_true",
        help="print the folder of the local tasks' lm-eval YAML files (for lm_eval --include_path) and exit",
    )
    ev.add_argument(
        "--stream",
        action="store_true",
        help="perplexity with one decoder layer in memory at a time (no tasks)",
    )
    ev.set_defaults(func=_eval)


def _search_parser(sub: argparse._SubParsersAction) -> None:
    se = sub.add_parser("search", help="Optuna search of the per-layer allocation (resumable)")
    se.add_argument("recipe")
    se.add_argument(
        "--trials", type=int, help="total trials in the study (default: allocation.search.trials)"
    )
    se.add_argument("--storage", help="Optuna storage URL (default: sqlite file beside the output)")
    se.add_argument("--output", "-o", help="search folder (default: <output.dir>/search)")
    se.add_argument("--workers", type=int, default=1, help="worker processes sharing the study")
    se.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    se.add_argument("--compile", action="store_true", help="also prune the model with the winner recipe")
    se.add_argument(
        "--no-validate",
        action="store_true",
        help="skip compiling uniform and winner and measuring both on the recipe's evaluate sets",
    )
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(func=_search)


def _export_parser(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="a pruned output to GGUF (llama.cpp) or a DeciLM checkpoint (vLLM)")
    ex.add_argument("run_dir", help="a pruned output folder")
    ex.add_argument("--format", required=True, choices=["gguf", "decilm"])
    ex.add_argument(
        "--outtype",
        default="f16",
        choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
        help="weight type (q8_0, q4_0, q4_k_m: gguf only, widths must be whole quant blocks; norms stay f32)",
    )
    ex.add_argument(
        "--output", "-o", help="output file/folder (default: beside RUN_DIR, RUN_DIR-OUTTYPE.gguf)"
    )
    ex.add_argument(
        "--tokenizer-gguf", help="GGUF to copy tokenizer metadata from (default: the source model's own GGUF)"
    )
    ex.add_argument("--overwrite", action="store_true", help="replace an existing output")
    stream_help = "gguf: one tensor at a time (pruned outputs' default; --no-stream: load whole)"
    ex.add_argument("--stream", action=argparse.BooleanOptionalAction, help=stream_help)
    ex.set_defaults(func=_export)


def _speed_parser(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("speed", help="pruned vs dense speed where it is served (llama.cpp or PyTorch)")
    sp.add_argument("run_dir", help="a pruned output folder (its lock names the dense model)")
    sp.add_argument("--engine", default="llama.cpp", choices=["llama.cpp", "torch"])
    sp.add_argument("--rounds", type=int, default=10, help="alternating rounds (at least 10)")
    sp.add_argument("--prefill", type=int, default=512, help="prompt tokens prefilled in one batch")
    sp.add_argument("--decode", type=int, default=32, help="one-token decode steps after the prompt")
    sp.add_argument("--threads", type=int, help="CPU threads (default: the cores this process may use)")
    sp.add_argument(
        "--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"], help="GGUF type"
    )
    sp.add_argument("--tokenizer-gguf", help="GGUF to take the tokenizer from (default: the source model's)")
    sp.add_argument("--json", action="store_true", help="the whole table as JSON")
    sp.set_defaults(func=_speed)


def _report_parser(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser("report", help="print the report of a pruned output")
    rp.add_argument("dir")
    rp.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    """Every subcommand's parser (each added by its own function above)."""
    p = argparse.ArgumentParser(
        prog="secateur", description="Structured pruning of decoder LLMs from recipes."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in (
        _graph_parser,
        _prune_parser,
        _recipe_parser,
        _eval_parser,
        _search_parser,
        _export_parser,
        _speed_parser,
        _report_parser,
    ):
        add(sub)
    clean.register(sub)
    for register in _EXTRA_PARSERS:
        register(sub)
    return p


_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def _silence_libraries() -> None:
    """--quiet: no loading bars or info chatter from transformers and huggingface_hub either."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    disable_progress_bars()


class Terminated(SystemExit):
    """SIGTERM, raised where the process is, so every `finally` and atomic writer cleans up as on Ctrl-C."""


def _terminate(signum: int, _frame: Any) -> None:
    raise Terminated(128 + signum)


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """Turn SIGTERM into an exception for the command's duration (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _silence_libraries()
    try:
        with _sigterm_cleans_up():
            clean.announce_sweep(args.command)
            return args.func(args)
    except (CliError, ValueError, OSError) as e:  # OSError: a full disk, no permission, a missing file
        print(f"secateur {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every `finally` and atomic writer has cleaned up on the way here
        print(f"secateur {args.command}: interrupted; temporary output removed", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"secateur {args.command}: terminated (SIGTERM); temporary output removed", file=sys.stderr)
        return int(e.code or 143)
    except Exception as e:  # a bug of ours: one line (SECATEUR_DEBUG=1 shows the traceback), never exit 0
        if os.environ.get("SECATEUR_DEBUG"):
            raise
        loop = str(e).startswith("Symlink loop")  # pathlib's word for a path that points at itself
        kind = "error" if loop else f"internal error ({type(e).__name__}; please report it)"
        print(f"secateur {args.command}: {kind}: {e}", file=sys.stderr)
        return 2 if loop else 1


if __name__ == "__main__":
    sys.exit(main())
