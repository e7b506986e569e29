"""What a prune measures before and after: sizes, perplexity, speed (PyTorch and the serving
engine) and zero-shot tasks, for in-memory and streamed runs alike."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any

import torch

from secateur.export import tokenizer_gguf_for
from secateur.graph.count import decoder_linear_params, flops_per_token, total_params
from secateur.recipe.schema import Recipe
from secateur.runtime.export import ExportError
from secateur.runtime.measure.evaluate import perplexity
from secateur.runtime.measure.timing import measure_speed, speed_ratios, speed_warnings
from secateur.runtime.measure.zeroshot import run_zeroshot
from secateur.runtime.speed.engines import EngineUnavailable
from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
from secateur.runtime.store.deliver import DeliveryError, check_finite_source
from secateur.runtime.store.loader import LoadedModel
from secateur.runtime.store.stream import stream_perplexity
from secateur.speed import MIN_ROUNDS, measure_pair
from secateur.speed_target import target_of


def size_of(lm: LoadedModel, context: int = 512) -> dict[str, int]:
    """Parameter and FLOP counts reported before and after."""
    return {
        "params": total_params(lm.model),
        "decoder_linear_params": decoder_linear_params(lm.model, lm.adapter),
        "flops_per_token": flops_per_token(lm.model, lm.adapter, context),
    }


def evaluate_ppl(
    recipe: Recipe, lm: LoadedModel, base_dir: Path | None, cache: dict, progress: bool | str = False
) -> dict[str, float]:
    """Perplexity on every set of `evaluate.perplexity` (tokenized once, reused for dense and pruned)."""
    out = {}
    for ps in recipe.evaluate.perplexity:
        key = f"{ps.dataset}:{ps.split}@{ps.seqlen}" + (f"[{ps.max_windows}w]" if ps.max_windows else "")
        if key not in cache:
            text = load_text(ps.dataset, ps.split, recipe.calibration.data_root, base_dir)
            cache[key] = eval_windows(tokenize_text(lm.tokenizer, text), ps.seqlen, ps.max_windows)
        label = f"{progress} perplexity {key}" if isinstance(progress, str) else progress
        if lm.stream is not None:
            out[key] = stream_perplexity(lm.stream, cache[key], label)
        else:
            out[key] = perplexity(lm.model, cache[key], batch_size=1, progress=label)
    return out


def evaluate_pruned(
    recipe: Recipe,
    lm: LoadedModel,
    dense_copy: torch.nn.Module,
    base_dir: Path,
    ppl_cache: dict,
    dense_ppl: dict[str, float],
    progress: bool = True,
) -> dict[str, Any]:
    """Pruned perplexity, dense-vs-pruned speed measured alternately, and zero-shot tasks."""
    ev = recipe.evaluate
    out: dict[str, Any] = {
        "perplexity": {
            "dense": dense_ppl,
            "pruned": evaluate_ppl(recipe, lm, base_dir, ppl_cache, "pruned" if progress else False),
        }
    }
    lat = ev.latency
    speed = measure_speed(
        {"dense": dense_copy, "pruned": lm.model},
        lm.model.config.vocab_size,
        prefill_len=lat.prefill_len,
        batch_size=lat.batch_size,
        decode_tokens=lat.decode_tokens,
        repeats=lat.repeats,
        progress=progress,
    )
    out["speed"] = {name: vars(r) for name, r in speed.items()}
    out["speed"]["ratios"] = speed_ratios(speed)["pruned"]
    out["speed"]["warnings"] = speed_warnings(speed)
    out["speed"]["device"] = str(lm.device)
    out.update(engine_speed(recipe, lm, dense_copy, base_dir, progress))
    if ev.tasks:
        root = recipe.calibration.data_root
        out["zeroshot"] = {
            "dense": run_zeroshot(dense_copy, lm.tokenizer, ev.tasks, root, ev.limit),
            "pruned": run_zeroshot(lm.model, lm.tokenizer, ev.tasks, root, ev.limit),
        }
    return out


def engine_speed(
    recipe: Recipe, lm: LoadedModel, dense: torch.nn.Module, base_dir: Path, progress: bool
) -> dict[str, Any]:
    """Dense vs pruned in the serving target's engine when it is not PyTorch (which `speed` already
    measured): {"engine_speed": table} or {"engine_speed_skipped": why}."""
    t = target_of(recipe)
    if t.engine == "torch":
        return {}
    if t.engine != "llama.cpp":
        return {
            "engine_speed_skipped": f"not measured in {t.engine}: measure it with `secateur speed` on its machine"
        }
    try:
        tok = tokenizer_gguf_for(lm.source, None, "report speed in llama.cpp")
        lat = recipe.evaluate.latency
        dense_lm = dataclasses.replace(lm, model=dense)
        table = measure_pair(
            dense_lm,
            lm,
            "llama.cpp",
            tok,
            rounds=max(MIN_ROUNDS, lat.repeats),
            prefill=lat.prefill_len,
            decode=lat.decode_tokens,
            threads=t.threads,
            outtype=t.quant or t.dtype,
            data_root=recipe.calibration.data_root,
            log=print if progress else None,
        )
    except (EngineUnavailable, ExportError, ValueError) as e:
        return {"engine_speed_skipped": f"not measured in {t.engine}: {e}"}
    return {"engine_speed": table}


def wikitext_perplexity(lm: LoadedModel, ref: str, seqlen: int, windows: int | None, root: Any) -> str:
    """`secateur eval --ppl-seqlen`: WikiText-2 test perplexity as one line, refused (not printed as
    nan) when the weights or logits are not finite, warned beyond the model's positions."""
    if lm.stream is None:  # NaN/inf weights give NaN scores: name the tensor instead
        check_finite_source(lm.model.state_dict().items(), ref)
    positions = getattr(getattr(lm.model, "config", None), "max_position_embeddings", None)
    if positions and seqlen > positions:
        print(
            f"warning: --ppl-seqlen {seqlen} is longer than the model's {positions} positions "
            "(max_position_embeddings); perplexity there is outside what the model was trained on",
            file=sys.stderr,
        )
    batch = eval_windows(tokenize_text(lm.tokenizer, load_text("wikitext2", "test", root)), seqlen, windows)
    ppl = stream_perplexity(lm.stream, batch) if lm.stream is not None else perplexity(lm.model, batch)
    if not math.isfinite(ppl):
        raise DeliveryError(
            f"{ref}: wikitext2 test perplexity is {ppl} (non-finite logits; non-finite weights, or a dtype "
            "too narrow for the activations: try --dtype float32)"
        )
    return f"wikitext2 test perplexity (seqlen {seqlen}, {batch.shape[0]} windows): {ppl:.3f}"
