"""Timing one model in its engine, the way it is served: a prompt prefilled in one batch with the
KV cache on, then one-token decode steps, only the last position's logits computed.

`Timer`s give raw seconds per round; `rounds.alternate` interleaves several models round by round
so they share the machine's state. llama.cpp is timed through llama-cpp-python (one model open at
a time: two open in one process crash libllama in 0.3.x); PyTorch through runtime.timing's
prefill/decode loops, the same code the prune report uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateur.runtime.timing import model_device, time_decode, time_prefill

ENGINES = ("llama.cpp", "torch", "vllm")


class EngineUnavailable(RuntimeError):
    """The target engine cannot run on this machine (package missing, no device)."""


@dataclass(frozen=True)
class Phases:
    """Seconds for one prefill of `prefill_len` tokens and for `decode_tokens` decode steps."""

    prefill_s: float
    decode_s: float


def default_threads() -> int:
    """The cores this process may use (its CPU affinity; os.cpu_count where there is none)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def engine_version(engine: str) -> str:
    """The version string that keys cached timings (a new engine build may be faster or slower)."""
    if engine == "llama.cpp":
        try:
            import llama_cpp
        except Exception as e:  # missing package or broken native library
            raise EngineUnavailable(
                f"target.engine llama.cpp: llama-cpp-python is not importable ({type(e).__name__}: {e}); "
                "install it (pip install 'secateur[llama]') or set target.engine: torch"
            ) from e
        return f"llama-cpp-python {llama_cpp.__version__}"
    if engine == "torch":
        import torch

        return f"torch {torch.__version__}"
    if engine == "vllm":
        try:
            import vllm
        except Exception as e:
            raise EngineUnavailable(
                f"target.engine vllm: vllm is not importable here ({type(e).__name__}); it needs a CUDA "
                "machine with vllm installed"
            ) from e
        return f"vllm {vllm.__version__}"
    raise ValueError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")


def time_gguf(path: str | Path, prompt: Sequence[int], decode: Sequence[int], threads: int) -> Phases:
    """Open a GGUF in llama.cpp, warm it up with one short prefill, and time one prefill + decode."""
    from llama_cpp import Llama

    n_ctx = len(prompt) + len(decode) + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=len(prompt),
        n_ubatch=min(len(prompt), 512),
        logits_all=False,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        llm.reset()
        llm.eval(list(prompt[: min(32, len(prompt))]))
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(list(prompt))
        t1 = time.perf_counter()
        for tok in decode:
            llm.eval([int(tok)])
        t2 = time.perf_counter()
    finally:
        llm.close()
    return Phases(t1 - t0, t2 - t1)


def time_torch(
    model: Any, prefill_len: int, decode_tokens: int, threads: int | None, seed: int = 0
) -> Phases:
    """One prefill (no cache) and `decode_tokens` cached decode steps of a transformers model."""
    if threads:
        torch.set_num_threads(int(threads))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    dev = model_device(model)
    ids = torch.randint(0, vocab, (1, prefill_len), generator=g).to(dev)
    with torch.inference_mode():
        return Phases(time_prefill(model, ids), time_decode(model, ids[:, :16], decode_tokens))


def alternate(
    timers: dict[str, Callable[[], Phases]], rounds: int, warmup: int = 1
) -> dict[str, list[Phases]]:
    """Run every timer once per round, round after round, so all share the machine's state; the
    warm-up rounds are dropped."""
    out: dict[str, list[Phases]] = {k: [] for k in timers}
    for r in range(warmup + rounds):
        for name, t in timers.items():
            p = t()
            if r >= warmup:
                out[name].append(p)
    return out
