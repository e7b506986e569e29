"""Run an exported GGUF in llama.cpp itself (llama-cpp-python): logits, perplexity, speed.

This is the check that an export is right: llama.cpp's own logits on the same token ids as
Secateur's PyTorch evaluation. llama-cpp-python is optional (`pip install secateur[llama]`, which
builds llama.cpp from source); `available()` says why it cannot be used.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def available() -> str | None:
    """None when llama_cpp imports, else the reason it does not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # a missing package or a broken native library both mean "cannot run"
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e})"
    return None


@contextlib.contextmanager
def open_gguf(
    path: str | Path, n_ctx: int, threads: int | None = None, all_logits: bool = True
) -> Iterator[Any]:
    """A llama.cpp model; `all_logits` keeps the logits of every evaluated position (else the last)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=all_logits,
        n_threads=threads or min(os.cpu_count() or 1, 2),
        verbose=False,
    )
    try:
        yield llm
    finally:
        llm.close()


def logits(llm: Any, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence, evaluated from an empty cache."""
    llm.reset()
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(llm: Any, windows: torch.Tensor) -> float:
    """Mean next-token NLL over windows [n, seqlen], the protocol of runtime.evaluate."""
    total, count = 0.0, 0
    for row in windows.tolist():
        lg = torch.from_numpy(logits(llm, row)).double()
        target = torch.tensor(row[1:])
        total += float(torch.nn.functional.cross_entropy(lg[:-1], target, reduction="sum"))
        count += len(row) - 1
    return total / count


def perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean NLL) of a GGUF file in llama.cpp on the same windows Secateur evaluates."""
    with open_gguf(path, int(windows.shape[1]), threads) as llm:
        return float(np.exp(window_nll(llm, windows)))


def speed(llm: Any, prompt: Sequence[int], decode: Sequence[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): one prompt, then one-token steps over `decode` (the
    text's own next tokens: the same work as sampling them). Open the model with all_logits=False
    so llama.cpp computes the LM head for the last position of each step only, as a server does."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(list(map(int, prompt)))
    t1 = time.perf_counter()
    for tok in decode:
        llm.eval([int(tok)])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(decode) / (t2 - t1)
