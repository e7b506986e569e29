"""Median time and spread of probe models in the serving target's engine, cached on disk.

Probes are timed alternately, round by round (so a burst of background load hits all of them),
with a warm-up round dropped; each shape's medians and interquartile spreads are stored under a
key of the machine, engine version, weight type, threads and shape, so a later run reuses them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from secateur.runtime.measure.timing import SPREAD_LIMIT, relative_spread
from secateur.runtime.speed import cache
from secateur.runtime.speed.engines import GGUFTimer, Phases, alternate, engine_version, time_torch
from secateur.runtime.speed.probe import ProbeShape, probe_torch_model, write_probe_gguf
from secateur.runtime.store.leftovers import partial_dir

ATTEMPTS = 3  # a busy measurement is repeated up to this many times
K = TypeVar("K")


@dataclass(frozen=True)
class Target:
    """Where the pruned model will be served, and the work one request does there."""

    engine: str = "llama.cpp"
    device: str = "cpu"
    dtype: str = "f16"  # GGUF type for llama.cpp (f32/f16/bf16), torch dtype name otherwise
    quant: str | None = None  # GGUF quantisation (q8_0, q4_0, q4_k_m); llama.cpp only
    threads: int = 1
    prefill_len: int = 512
    decode_tokens: int = 32
    rounds: int = 7  # alternating rounds per probe measurement (a busy one is repeated)

    @property
    def weight_type(self) -> str:
        """What the weights are stored as in the engine."""
        return self.quant or self.dtype

    def describe(self) -> str:
        return f"{self.engine} ({self.device}, {self.weight_type}, {self.threads} threads)"


@dataclass(frozen=True)
class Timing:
    """Medians over the timed rounds and interquartile range / median (None under 3 rounds)."""

    prefill_s: float
    decode_s: float
    prefill_spread: float | None
    decode_spread: float | None
    rounds: int
    busy: bool = False  # a spread stayed above SPREAD_LIMIT after every retry: not cached, not trusted

    @property
    def worst_spread(self) -> float:
        return max(self.prefill_spread or 0.0, self.decode_spread or 0.0)

    def phase(self, name: str) -> float:
        return self.prefill_s if name == "prefill" else self.decode_s


def summarise(samples: list[Phases]) -> Timing:
    """Median and spread of each phase over rounds."""
    pre = [s.prefill_s for s in samples]
    dec = [s.decode_s for s in samples]
    t = Timing(
        statistics.median(pre),
        statistics.median(dec),
        relative_spread(pre),
        relative_spread(dec),
        len(samples),
    )
    return replace(t, busy=t.worst_spread > SPREAD_LIMIT)


def measure_alternating(
    timers: dict[K, Callable[[], Phases]], rounds: int, progress: Callable[[str], None] | None = None
) -> dict[K, Timing]:
    """Medians and spreads of timers run alternately; while any spread is over SPREAD_LIMIT the whole
    set is measured again (up to ATTEMPTS times), keeping each timer's tightest attempt. A result
    still over the limit is marked busy: the caller says so instead of printing noise."""
    out: dict[K, Timing] = {}
    for attempt in range(ATTEMPTS):
        samples = alternate(timers, rounds)
        for k in timers:
            t = summarise(samples[k])
            if k not in out or t.worst_spread < out[k].worst_spread:
                out[k] = t
        busy = [k for k in timers if out[k].busy]
        if not busy:
            break
        if progress and attempt + 1 < ATTEMPTS:
            progress(
                f"timings spread up to {max(out[k].worst_spread for k in busy):.0%} (limit "
                f"{SPREAD_LIMIT:.0%}): the machine is busy; measuring again"
            )
    return out


def _key(target: Target, shape: ProbeShape) -> str:
    return cache.cache_key(
        "probe",
        engine=target.engine,
        version=engine_version(target.engine),
        device=target.device,
        weights=target.weight_type,
        threads=target.threads,
        prefill=target.prefill_len,
        decode=target.decode_tokens,
        shape=shape.key(),
    )


def _gguf_timer(target: Target, shape: ProbeShape, folder: Path) -> Callable[[], Phases]:
    path = write_probe_gguf(shape, folder / f"probe-{abs(hash(shape))}.gguf", target.weight_type)
    prompt = [3 + (i * 7919) % (shape.vocab - 3) for i in range(target.prefill_len)]
    decode = [3 + (i * 104729) % (shape.vocab - 3) for i in range(target.decode_tokens)]
    return GGUFTimer(path, prompt, decode, target.threads)


def _torch_timer(target: Target, shape: ProbeShape) -> Callable[[], Phases]:
    model = probe_torch_model(shape, getattr(torch, target.dtype), target.device)
    return lambda: time_torch(model, target.prefill_len, target.decode_tokens, target.threads)


def time_shapes(
    target: Target,
    shapes: list[ProbeShape],
    rounds: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[ProbeShape, Timing]:
    """Each shape's timing in the target engine: from the cache, else measured alternately."""
    rounds = rounds or target.rounds
    out: dict[ProbeShape, Timing] = {}
    todo = []
    for s in dict.fromkeys(shapes):
        rec = cache.load(_key(target, s))
        if rec is not None:
            out[s] = Timing(**rec["timing"])
        else:
            todo.append(s)
    if not todo:
        return out
    if target.engine not in ("llama.cpp", "torch"):
        raise NotImplementedError(  # (an engine not installed here already failed its cache key)
            f"probe timing in {target.engine} is not implemented; use llama.cpp or torch"
        )
    if progress:
        progress(f"timing {len(todo)} probe model(s) in {target.describe()}, {rounds} alternating rounds")
    with partial_dir(prefix="secateur-probe-", purpose="speed probe GGUFs") as tmp:
        if target.engine == "llama.cpp":
            timers = {s: _gguf_timer(target, s, Path(tmp)) for s in todo}
        else:
            timers = {s: _torch_timer(target, s) for s in todo}
        out.update(measure_alternating(timers, rounds, progress))
    for s in todo:
        if not out[s].busy:
            cache.store(
                _key(target, s), {"shape": s.key(), "target": asdict(target), "timing": asdict(out[s])}
            )
    return out
