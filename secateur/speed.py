"""`secateur speed RUN`: the pruned model against its dense source where it is served.

llama.cpp: both are exported to GGUF (the type the target names) in a temporary folder and timed
alternately, each in its own child process that loads it once and warms it up (a llama.cpp crash is
reported as the engine being unavailable, not the end of this process), each round a prefill of the
prompt and one-token decode steps with the KV cache. PyTorch: both are loaded and timed alternately
with runtime.measure.timing's prefill and cached-decode loops. At least 10 rounds; medians, interquartile
spread, and the realised share of the FLOPs ratio ((speedup - 1) / (FLOPs ratio - 1)). A
measurement whose spread stays above 10% after three attempts is reported as busy, not as a speedup.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from secateur.export import source_of, tokenizer_gguf_for
from secateur.graph.adapters import adapter_for
from secateur.graph.groups import layer_shapes
from secateur.lock import LOCK_NAME, read_lock
from secateur.runtime.export.gguf import write_gguf
from secateur.runtime.speed.engines import GGUFTimer, Phases, default_threads, engine_version, time_torch
from secateur.runtime.speed.measure import measure_alternating
from secateur.runtime.speed.table import speed_table
from secateur.runtime.store.data import load_text, tokenize_text
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.leftovers import partial_dir
from secateur.runtime.store.loader import LoadedModel, load_model

MIN_ROUNDS = 10


def _prompt(lm: LoadedModel, n: int, data_root: str | None) -> list[int]:
    """Real text (WikiText-2 test) when the data root has it, else fixed pseudo-random ids."""
    try:
        ids = tokenize_text(lm.tokenizer, load_text("wikitext2", "test", data_root)).reshape(-1)
        return [int(i) for i in ids[:n]]
    except Exception:  # no data root here: speed does not depend on which tokens are fed
        vocab = int(lm.model.get_input_embeddings().weight.shape[0])
        return [3 + (i * 7919) % (vocab - 3) for i in range(n)]


def measure_pair(
    dense: LoadedModel,
    pruned: LoadedModel,
    engine: str,
    tokenizer_gguf: Path | None = None,
    rounds: int = MIN_ROUNDS,
    prefill: int = 512,
    decode: int = 32,
    threads: int | None = None,
    outtype: str = "f16",
    data_root: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Dense vs pruned in `engine`, alternating; the table `format_speed` prints."""
    rounds = max(rounds, MIN_ROUNDS)
    threads = threads or default_threads()
    version = engine_version(engine)
    ids = _prompt(dense, prefill + decode, data_root)
    prompt, steps = ids[:prefill], ids[prefill : prefill + decode]
    models = {"dense": dense, "pruned": pruned}
    with partial_dir(prefix="secateur-speed-", purpose="secateur speed GGUFs") as tmp:
        if engine == "llama.cpp":
            if tokenizer_gguf is None:
                raise ValueError(
                    "speed in llama.cpp needs a tokenizer GGUF (the source model's, or --tokenizer-gguf)"
                )
            files = {k: Path(tmp) / f"{k}.gguf" for k in models}
            dense_layer = layer_shapes(dense.model, dense.adapter, 0)  # what pruned row lengths are judged by
            for k, lm in models.items():
                write_gguf(lm.model, lm.adapter, files[k], tokenizer_gguf, outtype, dense_layer=dense_layer)
            timers: dict[str, Callable[[], Phases]] = {
                k: GGUFTimer(f, prompt, steps, threads) for k, f in files.items()
            }
        elif engine == "torch":
            timers = {
                k: (lambda lm=lm: time_torch(lm.model, prefill, decode, threads)) for k, lm in models.items()
            }
        else:
            raise ValueError(f"speed: engine {engine!r} is not measured here (llama.cpp, torch)")
        if log:
            log(f"speed: dense vs pruned in {version}, {threads} threads, {rounds} alternating rounds")
        t = measure_alternating(timers, rounds, log)
    return speed_table(dense, pruned, t, engine, version, threads, prefill, decode, outtype, rounds)


def run_speed(
    run: str | Path,
    engine: str = "llama.cpp",
    rounds: int = MIN_ROUNDS,
    prefill: int = 512,
    decode: int = 32,
    threads: int | None = None,
    outtype: str = "f16",
    tokenizer_gguf: str | Path | None = None,
    data_root: str | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """`secateur speed RUN`: load the run and its dense source, measure both in `engine`."""
    run = Path(run)
    source = source_of(run)
    if source is None:
        raise ValueError(f"{run}: no recipe.lock.yaml names the dense model this output was pruned from")
    tok = tokenizer_gguf_for(source, tokenizer_gguf, "speed") if engine == "llama.cpp" else None
    lock = read_lock(run / LOCK_NAME)
    dense = load_model(source.ref, "float32", "cpu", base_dir=lock.get("recipe_dir"))
    positions = getattr(dense.model.config, "max_position_embeddings", None)
    if positions and prefill + decode > positions:  # beyond its context a model is not served (and the
        # attention of a 100,000-token prefill alone would not fit in memory)
        raise ValueError(
            f"--prefill {prefill} + --decode {decode} tokens exceed the {positions} positions of {source.ref}; "
            f"time at most {positions} tokens"
        )
    pruned_model = load_pruned(run, torch.float32)
    pruned = LoadedModel(
        pruned_model, adapter_for(pruned_model.config), dense.tokenizer, source, dense.device, torch.float32
    )
    return measure_pair(dense, pruned, engine, tok, rounds, prefill, decode, threads, outtype, data_root, log)
