"""Checks that need a model's shapes but no weights and no data, run before anything heavy.

`secateur prune` runs them on a weightless skeleton before it loads the model or reads
calibration text, and `secateur recipe explain` runs the same ones, so a recipe that cannot be
applied to a model fails in seconds with the key at fault.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.recipe.compile import BudgetError, eligible_layers, stage_counts
from secateur.recipe.methods import names_with, spoken
from secateur.recipe.schema import Recipe
from secateur.runtime.methods import get_method
from secateur.runtime.prune.stage import CheckContext, StagePlan
from secateur.runtime.store.folder import is_pruned_folder
from secateur.runtime.store.io import pruned_skeleton
from secateur.runtime.store.loader import load_config, resolve_source


@functools.lru_cache(maxsize=8)
def _config(ref: str, base_dir: str | None) -> Any:
    return load_config(resolve_source(ref, base_dir))


def load_skeleton(ref: str, base_dir: str | Path | None = None) -> tuple[nn.Module, ModelAdapter]:
    """A weightless model with the real shapes (meta tensors) and its adapter.

    A Secateur output is rebuilt with its recorded per-layer shapes, so pruning a pruned model
    is checked against what it really is.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    src = resolve_source(ref, str(base_dir) if base_dir else None)
    if Path(src.path).is_dir() and is_pruned_folder(src.path):
        model = pruned_skeleton(src.path)
    else:
        config = copy.deepcopy(_config(ref, str(base_dir) if base_dir else None))
        adapter_for(config)
        config.__dict__.pop("quantization_config", None)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    return model, adapter_for(model.config)


def plan_stages(recipe: Recipe, model: nn.Module, adapter: ModelAdapter) -> StagePlan:
    """Stages, their parameter counts and eligible layers, each stage checked by its method."""
    stages = recipe.stages()
    counts = stage_counts(recipe, model, adapter)
    stage_layers = []
    for st, count in zip(stages, counts):
        layers = eligible_layers(st.targets, adapter.num_layers, adapter.layers_path)
        where = ".".join(str(p) for p in st.path) + "." if st.path else ""
        if not layers:
            raise BudgetError(
                f"{where}targets: no layer of the model's {adapter.num_layers} is eligible "
                f"(targets.layers {list(st.targets.layers)!r}, targets.protect "
                f"first={st.targets.protect.first} last={st.targets.protect.last} "
                f"layers={list(st.targets.protect.layers)}); the prune would change nothing"
            )
        if count <= 0:
            raise BudgetError(
                f"{where}budget: this stage would remove no parameter; the prune would change nothing"
            )
        ctx = CheckContext(
            model=model, adapter=adapter, stage=st, recipe=recipe, params_to_remove=count, layers=layers
        )
        get_method(st.method).check(ctx)
        stage_layers.append(layers)
    return StagePlan(stages, counts, stage_layers)


# uniform and table plans come from shapes; global and proportional from a first streamed pass
# over the dense layers (runtime/stage.py), before the pruning pass
STREAMED_ALLOCATIONS = ("uniform", "table", "global", "proportional")


class StreamError(ValueError):
    """A recipe that cannot run with model.stream, named by its key."""


def check_streamable(recipe: Recipe) -> None:
    """Refuse, before any work, what needs the whole model at once."""
    stages = recipe.stages()
    if len(stages) > 1:
        raise StreamError(
            f"model.stream: a recipe with {len(stages)} passes cannot stream (each pass would need the "
            f"previous one's whole output); run the passes as separate prunes, or set model.stream: false"
        )
    if stages[0].heal is not None:
        raise StreamError(
            "model.stream: healing trains the whole pruned model in memory; prune with streaming first, "
            "or set model.stream: false to heal"
        )
    spec = stages[0].spec
    if not spec.streams:
        use = spoken(names_with("streams"), "or")
        raise StreamError(
            f"model.stream: method {spec.name!r} cannot stream: {spec.whole_model}; use method {use}, "
            "or set model.stream: false"
        )
    if recipe.allocation.method not in STREAMED_ALLOCATIONS:
        raise StreamError(
            f"model.stream: allocation.method {recipe.allocation.method!r} cannot stream; streaming supports "
            f"{spoken([repr(a) for a in STREAMED_ALLOCATIONS], 'and')}"
        )
    if any(e.format != "gguf" for e in recipe.output.export):
        raise StreamError(
            "model.stream: output.export decilm converts the whole pruned model in memory (only gguf exports "
            "stream); drop it and run `secateur export OUTPUT --format decilm` on the output where it fits"
        )
    if recipe.evaluate.enabled and recipe.evaluate.tasks:
        raise StreamError(
            "model.stream: evaluate.tasks (zero-shot) needs the whole model; set evaluate.tasks: [] and run "
            "`secateur eval` on the output where it fits in memory"
        )


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_resources(recipe: Recipe, adapter: ModelAdapter) -> list[str]:
    """Before loading: the calibration activations one layer holds (n_samples x seqlen x hidden,
    float32) must fit in available memory (else an error); sequence lengths beyond the model's
    positions are returned as warnings (RoPE models run past them, but quality there is untrained)."""
    cfg = adapter.config
    limit = getattr(cfg, "max_position_embeddings", None)
    cal, ev = recipe.calibration, recipe.evaluate
    lengths = {
        "calibration.seqlen": cal.seqlen,
        "calibration.heldout_seqlen": cal.heldout_seqlen,
        "evaluate.latency.prefill_len + decode_tokens": ev.latency.prefill_len + ev.latency.decode_tokens,
        **{f"evaluate.perplexity.{i}.seqlen": ps.seqlen for i, ps in enumerate(ev.perplexity)},
    }
    warnings = []
    if limit:
        for key, n in lengths.items():
            if key.startswith("evaluate") and not ev.enabled:
                continue
            if n > int(limit):
                warnings.append(
                    f"warning: {key}: {n} tokens is longer than the model's {limit} positions "
                    "(max_position_embeddings); results there are outside what the model was trained on"
                )
    need = cal.n_samples * cal.seqlen * adapter.hidden_size * 4
    free = _available_memory()
    if free is not None and need > free:
        raise BudgetError(
            f"calibration.n_samples x seqlen: {cal.n_samples} x {cal.seqlen} tokens need {need / 2**30:.1f} GiB for "
            f"one layer's activations (float32, hidden {adapter.hidden_size}) but {free / 2**30:.1f} GiB is available; "
            "lower calibration.n_samples or seqlen"
        )
    return warnings
