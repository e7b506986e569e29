"""Copy the measured rows of bench/results/*.json into recipes_examples/README.md.

Not a test. Each example recipe gets the row of the benchmark that ran it (fasp_bench for the
uniform FASP recipes, search_bench for search-30, methods_bench for the others); recipes without a
measurement are listed as such. The table replaces the block between the two marker comments.

    python bench/examples_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
README = REPO / "recipes_examples" / "README.md"
BEGIN, END = "<!-- measured:begin -->", "<!-- measured:end -->"


def _load(name: str) -> list[dict] | dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _allocation(stem: str) -> str:
    """The example recipe's allocation method: fasp_bench and methods_bench measured FASP recipes
    with uniform allocation only."""
    path = REPO / "recipes_examples" / f"{stem}.yaml"
    doc = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return str((doc.get("allocation") or {}).get("method", "uniform"))


def measured_rows() -> dict[str, dict]:
    """recipe stem -> {ppl, ratio, decoder, prune_s, prefill, decode, source} from every bench."""
    rows: dict[str, dict] = {}
    fasp = _load("fasp") or []
    dense = next((r for r in fasp if r["variant"] == "dense"), None)
    for r in fasp:
        stem = f"fasp-{round(r['ratio'] * 100)}"
        if r["variant"] == "FASP + restore" and dense and _allocation(stem) == "uniform":
            rows[stem] = {
                "ppl": r["ppl_2048"],
                "dense_ppl": dense["ppl_2048"],
                "decoder": r["decoder_linear_params"],
                "dense_decoder": dense["decoder_linear_params"],
                "prune_s": r.get("prune_s"),
                "prefill": r.get("prefill_speedup"),
                "decode": r.get("decode_speedup"),
                "source": "fasp.md",
            }
    methods = _load("methods") or []
    mdense = next((r for r in methods if r["method"] == "dense"), None)
    for r in methods:
        if r["method"] != "dense" and mdense:
            stem = Path(r["recipe"]).stem
            if stem != f"{r['method']}-{round(r['ratio'] * 100)}":
                continue  # a registered method run through the FASP recipe has no example of its own
            if r["method"] == "fasp" and _allocation(stem) != "uniform":
                continue  # measured before fasp-20.yaml took angular block shares (2026-11-30)
            rows[stem] = {
                "ppl": r["ppl"],
                "dense_ppl": mdense["ppl"],
                "decoder": r["decoder_linear_params"],
                "dense_decoder": mdense["decoder_linear_params"],
                "prune_s": r.get("prune_s"),
                "prefill": r.get("prefill_speedup"),
                "decode": r.get("decode_speedup"),
                "source": "methods.md",
            }
    search = _load("search")
    if isinstance(search, dict):
        recipe = REPO / "recipes_examples" / "search-30.yaml"
        knots = yaml.safe_load(recipe.read_text())["allocation"]["search"].get("knots", 0)
        sampler = yaml.safe_load(recipe.read_text())["allocation"]["search"].get("sampler", "tpe")
        for r in search["rows"]:
            if "sampler" in r:  # the stitched-variants benchmark: its rows carry their own evaluation
                if r["sampler"] != sampler or "decoder_linear_params" not in r or "dense_ppl" not in search:
                    continue
                rows[f"search-{round(r['ratio'] * 100)}"] = {
                    "ppl": r["ppl"],
                    "dense_ppl": search["dense_ppl"],
                    "decoder": r["decoder_linear_params"],
                    "dense_decoder": dense["decoder_linear_params"] if dense else None,
                    "prune_s": r["search_s"],
                    "prefill": None,
                    "decode": None,
                    "source": "search.md",
                }
                continue
            if r.get("knots", 0) != knots:
                continue  # the row of the search space the example recipe uses
            dec = r["searched_decoder_params"]
            rows[f"search-{round(r['ratio'] * 100)}"] = {
                "ppl": r["searched_ppl_2048"],
                "dense_ppl": search["dense_ppl_2048"],
                "decoder": dec,
                "dense_decoder": dense["decoder_linear_params"] if dense else None,
                "prune_s": r["search_s"],
                "prefill": None,
                "decode": None,
                "source": "search.md",
            }
    return rows


def table() -> str:
    rows = measured_rows()
    lines = [
        "| recipe | removed | decoder linear params | WikiText-2 ppl@2048 | x dense | prune s | prefill x | decode x "
        "| from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(REPO.glob("recipes_examples/*.yaml")):
        r = rows.get(path.stem)
        if r is None:
            lines.append(f"| {path.stem} | {elsewhere(path.stem)} | | | | | | | |")
            continue
        removed = f"{1 - r['decoder'] / r['dense_decoder']:.1%}" if r["dense_decoder"] else "-"

        def x(v: float | None) -> str:
            return f"{v:.2f}" if v is not None else "-"

        prune_s = f"{r['prune_s']:.0f}" if r["prune_s"] is not None else "-"
        lines.append(
            f"| {path.stem} | {removed} | {r['decoder']:,} | {r['ppl']:.2f} | {r['ppl'] / r['dense_ppl']:.2f} "
            f"| {prune_s} | {x(r['prefill'])} | {x(r['decode'])} | [{r['source']}](../bench/results/{r['source']}) |"
        )
    lines += ["", best_line(rows)]
    return "\n".join(lines)


def elsewhere(stem: str) -> str:
    """Where a recipe without a row here is measured under another protocol, if it is anywhere:
    Gemma 3 recipes in the Gemma methods table, quality-NN (and fasp-NN with a non-uniform
    allocation) in quality.md and search-NN in search.md
    (full test set). Only a table that holds the recipe's own row is named."""
    pct = stem.rsplit("-", 1)[-1]
    ratio = int(pct) / 100 if pct.isdigit() else None
    if stem.startswith("gemma3-"):
        rows = _load("methods-gemma3-270m") or []
        if any(f"gemma3-{r['method']}-{round(r['ratio'] * 100)}" == stem for r in rows):
            return "Gemma 3 270M: [methods-gemma3-270m.md](../bench/results/methods-gemma3-270m.md)"
    elif stem.startswith(("quality-", "fasp-")):
        q = _load("quality") or {}
        if any(stem in r.get("recipes", []) for r in q.get("rows", [])):  # rows name the recipes they equal
            return "full test set: [quality.md](../bench/results/quality.md)"
    elif stem.startswith("search-"):
        s = _load("search") or {}
        if any(r.get("sampler") not in (None, "uniform") and r["ratio"] == ratio for r in s.get("rows", [])):
            return "full test set, stitched: [search.md](../bench/results/search.md)"
    return "not measured yet"


def best_line(rows: dict[str, dict]) -> str:
    """The lowest measured perplexity at each budget (recipes grouped by their -NN suffix)."""
    by_budget: dict[str, list[tuple[float, str]]] = {}
    for stem, r in rows.items():
        by_budget.setdefault(stem.rsplit("-", 1)[-1], []).append((r["ppl"], stem))
    best = [
        f"{pct}%: **{min(c)[1]}** (ppl {min(c)[0]:.2f} of {len(c)} measured)"
        for pct, c in sorted(by_budget.items(), key=lambda kv: int(kv[0]))
        if pct.isdigit()
    ]
    return "Best measured perplexity at each budget: " + ("; ".join(best) if best else "none yet") + "."


def main() -> None:
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")
    print(table())


if __name__ == "__main__":
    main()
