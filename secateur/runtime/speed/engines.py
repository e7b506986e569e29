"""Timing one model in its engine, the way it is served: a prompt prefilled in one batch with the
KV cache on, then one-token decode steps, only the last position's logits computed.

`Timer`s give raw seconds per round; `rounds.alternate` interleaves several models round by round
so they share the machine's state. llama.cpp is timed through llama-cpp-python, each model in its own
child process that loads it once (`GGUFTimer`, runtime/export/llamacpp.py: two models open in one
process crash libllama in 0.3.x, and a quantised prefill segfaults on some CPUs); PyTorch through
runtime.measure.timing's prefill/decode loops, the same code the prune report uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateur.runtime.export.llamacpp import LlamaProcess
from secateur.runtime.measure.timing import model_device, time_decode, time_prefill
from secateur.runtime.store.formats import EngineUnavailable  # defined in the leaf; importable from here

ENGINES = ("llama.cpp", "torch", "vllm")


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


class GGUFTimer:
    """Times one GGUF in llama.cpp, round after round, in a child process that loads it once (a
    crash there, like llama-cpp-python's on quantised GGUFs on some CPUs, is an EngineUnavailable
    naming the file, its type and the signal, never the end of this process). Callable; close() ends
    the child (`alternate` does it for every timer)."""

    def __init__(self, path: str | Path, prompt: Sequence[int], decode: Sequence[int], threads: int) -> None:
        self.path, self.prompt, self.decode, self.threads = Path(path), list(prompt), list(decode), threads
        self._llm: Any = None

    def __call__(self) -> Phases:
        if self._llm is None:
            n = len(self.prompt)
            self._llm = LlamaProcess(
                self.path,
                n + len(self.decode) + 8,
                self.threads,
                all_logits=False,
                n_batch=n,
                n_ubatch=min(n, 512),
            )
            self._llm.time(self.prompt[: min(32, n)], [])  # warm-up: weights paged in, threads started
        return Phases(*self._llm.time(self.prompt, self.decode))

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def time_gguf(path: str | Path, prompt: Sequence[int], decode: Sequence[int], threads: int) -> Phases:
    """Open a GGUF in llama.cpp (in a child process), warm it up with one short prefill, and time one
    prefill + decode."""
    timer = GGUFTimer(path, prompt, decode, threads)
    try:
        return timer()
    finally:
        timer.close()


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
    try:
        for r in range(warmup + rounds):
            for name, t in timers.items():
                p = t()
                if r >= warmup:
                    out[name].append(p)
    finally:
        for t in timers.values():
            close = getattr(t, "close", None)
            if close is not None:
                close()
    return out
