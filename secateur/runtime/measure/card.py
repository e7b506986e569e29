"""The model card (README.md) of an output folder, written through huggingface_hub's ModelCard.

It says what the folder is (base model, method, recipe, size before and after, quality and speed
when the run measured them, the dtype saved) and how to load it: plain transformers only when the
folder loads there exactly, always `secateur.load_pruned`, llama.cpp and vLLM through
`secateur export`. Every number comes from the run's report; nothing is re-measured here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from secateur.runtime.measure.report import result_sections

CARD_NAME = "README.md"


def _metadata(base_model: str | None, methods: list[str], plain: bool) -> Any:
    from huggingface_hub import ModelCardData

    return ModelCardData(
        base_model=base_model,
        library_name="transformers" if plain else None,
        pipeline_tag="text-generation",
        tags=["secateur", "pruned", "structured-pruning", *methods],
    )


def _loading(name: str, plain: bool) -> list[str]:
    out = ["## How to load", ""]
    if plain:
        out += [
            "Every layer has the same shape, so plain transformers loads it exactly:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{name}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            "```",
            "",
            "Secateur loads it too:",
        ]
    else:
        out += [
            "Its layers have different shapes (or removed branches, or added biases), which plain "
            "transformers cannot express: its config.json names a model type transformers refuses, so "
            "it can never load there with re-initialised weights. Load it with Secateur:",
        ]
    out += [
        "",
        "```python",
        "import secateur",
        "from transformers import AutoTokenizer",
        "",
        f'model = secateur.load_pruned("{name}")  # safetensors only, no remote code',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "# after healing or fine-tuning: secateur.save_pruned(model, OUT, tokenizer)",
        "# (model.save_pretrained(OUT) also keeps it loadable with secateur.load_pruned)",
        "```",
        "",
        "Inference engines:",
        "",
        f"- llama.cpp: `secateur export {name} --format gguf` writes a GGUF file "
        "(`llama` architecture when uniform, `deci` with per-layer shapes otherwise).",
        f"- vLLM: `secateur export {name} --format decilm` writes a DeciLM-style checkpoint "
        "(`block_configs`) that vLLM's DeciLM / Nemotron-NAS model reads.",
    ]
    return out


def _summary(report: dict[str, Any], base: str, methods: list[str]) -> str:
    size = report.get("size", {})
    d, p = size.get("dense", {}), size.get("pruned", {})
    parts = [f"Structurally pruned from {base} with Secateur ({', '.join(methods)})"]
    if d.get("params") and p.get("params"):
        parts.append(
            f": {p['params']:,} of {d['params']:,} parameters ({p['params'] / d['params']:.1%})"
            + (
                f", {p['flops_per_token'] / d['flops_per_token']:.1%} of the FLOPs per token"
                if d.get("flops_per_token") and p.get("flops_per_token")
                else ""
            )
        )
    text = "".join(parts) + "."
    if report.get("output_dtype"):
        text += f" Weights saved in {report['output_dtype']}"
        if report.get("dtype") and report["dtype"] != report["output_dtype"]:
            text += (
                f" (pruned in {report['dtype']}; the quality and speed below were measured on the saved "
                f"{report['output_dtype']} values)"
            )
        text += "."
    return text


_RECIPE_KEYS = ("method", "passes", "targets", "budget", "importance", "allocation", "restore")


def _recipe_core(recipe_yaml: str) -> str:
    """The recipe sections that say what was pruned (no model path, data or output settings)."""

    doc = yaml.safe_load(recipe_yaml) or {}
    core = {k: doc[k] for k in _RECIPE_KEYS if doc.get(k) not in (None, [], {})}
    if isinstance(core.get("allocation"), dict) and core["allocation"].get("method") != "search":
        core["allocation"].pop("search", None)
    if isinstance(core.get("importance"), dict) and core["importance"].get("metric") != "bonsai":
        core["importance"].pop("bonsai", None)
    return yaml.safe_dump(core, sort_keys=False)


def render_card(report: dict[str, Any], name: str, base_model: str | None, plain: bool) -> str:
    """README.md text: hub metadata (YAML front matter) and the body."""
    from huggingface_hub import ModelCard

    methods = list(dict.fromkeys(s.get("method", "?") for s in report.get("stages", []))) or ["secateur"]
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "a local checkpoint"
    body = [f"# {name}", _summary(report, base, methods), "\n".join(_loading(name, plain))]
    body += result_sections(report)
    if report.get("recipe_yaml"):
        body += [
            "## Recipe\n\nWhat was pruned and how (the whole recipe is `recipe.yaml`; "
            "`secateur prune --lock recipe.lock.yaml --output DIR` reproduces these weights bit for bit "
            "from the same model, data and versions):\n\n```yaml\n"
            + _recipe_core(report["recipe_yaml"])
            + "```"
        ]
    meta = _metadata(base_model, methods, plain).to_yaml()
    return str(ModelCard(f"---\n{meta}\n---\n\n" + "\n\n".join(body) + "\n"))


def write_card(folder: Path, report: dict[str, Any], name: str, base_model: str | None, plain: bool) -> None:
    """Write README.md into an output folder being assembled."""
    (Path(folder) / CARD_NAME).write_text(render_card(report, name, base_model, plain), encoding="utf-8")
