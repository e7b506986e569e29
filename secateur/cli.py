"""The `secateur` command line: thin wrappers that parse arguments and call the library."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


class CliError(Exception):
    """An error reported to the user as one clear line, exit code 2."""


def _graph(args: argparse.Namespace) -> int:
    from secateur.graph.build import build_graph, summarize
    from secateur.runtime.loader import load_model

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="secateur", description="Structured pruning of decoder LLMs from recipes."
    )
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("graph", help="print the coupled groups of a model")
    g.add_argument("model", help="short name (smollm2-135m), local folder, .gguf file or hub id")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    g.set_defaults(func=_graph)
    for register in _EXTRA_PARSERS:
        register(sub)
    return p


_EXTRA_PARSERS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"secateur {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
