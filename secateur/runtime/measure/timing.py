"""Honest speed: prefill/decode timings of models measured alternately.

Timing every model in the same process, interleaved round by round, exposes them all to the
same thermal state, clock boosts and background load; medians then resist stragglers. Peak
memory is only measured on CUDA; on CPU the resident weight bytes are reported instead.
"""

from __future__ import annotations

import inspect
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.count import weights_bytes

DECODE_PROMPT_LEN = 16


@dataclass
class SpeedResult:
    """Medians over repeats; throughput is tokens per second over the timed region only."""

    prefill_tok_s: float
    decode_tok_s: float
    prefill_s_median: float
    decode_s_median: float
    weights_bytes: int
    peak_mem_bytes: int | None
    device: str
    repeats: int = 1
    prefill_spread: float | None = None  # interquartile range / median of the timed repeats
    decode_spread: float | None = None


# a ratio is reported as supported only when it stands clear of the combined spread and that
# spread is small: otherwise the report says the timing is noise
SPREAD_LIMIT = 0.10


def relative_spread(times: list[float]) -> float | None:
    """Interquartile range over median (None with fewer than 3 repeats: no spread to speak of)."""
    if len(times) < 3:
        return None
    q = statistics.quantiles(times, n=4, method="inclusive")
    return (q[2] - q[0]) / statistics.median(times)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def sync(dev: torch.device) -> None:
    """Wait for queued GPU work so a wall-clock timer measures it (no-op on CPU)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    dev = ids.device
    sync(dev)
    t0 = time.perf_counter()
    model(ids, use_cache=False)
    sync(dev)
    return time.perf_counter() - t0


def _cache_kw(model: nn.Module) -> str:
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out["cache"] if "cache" in out else out["past_key_values"]


def time_decode(model: nn.Module, prompt: torch.Tensor, n_tokens: int) -> float:
    """Greedy decode of `n_tokens` with the model's own KV cache (a DynamicCache), not
    `generate` and its overheads; only the one-token steps are timed."""
    dev = prompt.device
    kw = _cache_kw(model)
    out = model(prompt, use_cache=True)
    past = _cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_tokens):
        out = model(nxt, use_cache=True, **{kw: past})
        past = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
    sync(dev)
    return time.perf_counter() - t0


def _run_once(model: nn.Module, prefill: torch.Tensor, prompt: torch.Tensor, n: int) -> tuple[float, float]:
    return time_prefill(model, prefill), time_decode(model, prompt, n)


def measure_speed(
    models: dict[str, nn.Module],
    vocab_size: int,
    prefill_len: int = 512,
    batch_size: int = 1,
    decode_tokens: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, SpeedResult]:
    """Prefill and decode throughput of every model, measured alternately round by round.

    On CUDA, peak_mem_bytes is this model's weights plus the most extra memory one of its
    runs allocated, so models resident side by side do not inflate each other's numbers.
    """
    if repeats < 1 or prefill_len < 1 or decode_tokens < 1 or batch_size < 1:
        raise ValueError("repeats, prefill_len, decode_tokens and batch_size must all be >= 1")
    g = torch.Generator().manual_seed(int(seed))
    prefill_cpu = torch.randint(0, vocab_size, (batch_size, prefill_len), generator=g)
    prompt_cpu = torch.randint(0, vocab_size, (batch_size, DECODE_PROMPT_LEN), generator=g)
    devs = {name: model_device(m) for name, m in models.items()}
    inputs = {name: (prefill_cpu.to(d), prompt_cpu.to(d)) for name, d in devs.items()}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in models}
    peaks: dict[str, int] = {name: 0 for name in models}
    wbytes = {name: weights_bytes(m) for name, m in models.items()}
    modes = {name: m.training for name, m in models.items()}
    try:
        for m in models.values():
            m.eval()
        with torch.inference_mode():
            rounds = range(warmup + repeats)
            if progress:
                rounds = tqdm(rounds, desc=f"speed ({' vs '.join(models)}, alternating)", unit="round")
            for r in rounds:
                for name, m in models.items():
                    dev = devs[name]
                    if dev.type == "cuda":
                        base = torch.cuda.memory_allocated(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                    t = _run_once(m, *inputs[name], decode_tokens)
                    if dev.type == "cuda":
                        extra = torch.cuda.max_memory_allocated(dev) - base
                        peaks[name] = max(peaks[name], extra + wbytes[name])
                    if r >= warmup:
                        times[name].append(t)
    finally:
        for name, m in models.items():
            m.train(modes[name])
    results: dict[str, SpeedResult] = {}
    for name in models:
        pre = statistics.median(t[0] for t in times[name])
        dec = statistics.median(t[1] for t in times[name])
        results[name] = SpeedResult(
            prefill_tok_s=batch_size * prefill_len / pre,
            decode_tok_s=batch_size * decode_tokens / dec,
            prefill_s_median=pre,
            decode_s_median=dec,
            weights_bytes=wbytes[name],
            peak_mem_bytes=peaks[name] if devs[name].type == "cuda" else None,
            device=str(devs[name]),
            repeats=len(times[name]),
            prefill_spread=relative_spread([t[0] for t in times[name]]),
            decode_spread=relative_spread([t[1] for t in times[name]]),
        )
    return results


def speed_ratios(results: dict[str, SpeedResult], baseline: str = "dense") -> dict[str, dict[str, float]]:
    """Each model relative to `baseline`: speedups (>1 is faster) and memory ratios (<1 is smaller)."""
    if baseline not in results:
        raise KeyError(f"baseline {baseline!r} not among measured models: {', '.join(results)}")
    b = results[baseline]
    out: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        ratios = {
            "prefill_speedup": r.prefill_tok_s / b.prefill_tok_s,
            "decode_speedup": r.decode_tok_s / b.decode_tok_s,
            "weights_ratio": r.weights_bytes / b.weights_bytes,
        }
        if r.peak_mem_bytes is not None and b.peak_mem_bytes:
            ratios["peak_mem_ratio"] = r.peak_mem_bytes / b.peak_mem_bytes
        out[name] = ratios
    return out


def speed_warnings(results: dict[str, SpeedResult], baseline: str = "dense") -> list[str]:
    """Why a speed ratio may not be supported by its measurement (few repeats, large spread)."""
    out = []
    b = results[baseline]
    for name, r in results.items():
        if name == baseline:
            continue
        for phase in ("prefill", "decode"):
            sb, sr = getattr(b, f"{phase}_spread"), getattr(r, f"{phase}_spread")
            ratio = getattr(r, f"{phase}_tok_s") / getattr(b, f"{phase}_tok_s")
            if sb is None or sr is None:
                out.append(
                    f"{phase} {name}/{baseline} {ratio:.2f}x from {min(r.repeats, b.repeats)} repeat(s): "
                    f"no spread measured, treat it as indicative (evaluate.latency.repeats >= 3)"
                )
                continue
            noise = (sb**2 + sr**2) ** 0.5
            if noise > SPREAD_LIMIT or abs(ratio - 1) < noise:
                out.append(
                    f"{phase} {name}/{baseline} {ratio:.2f}x is within its timing spread (+-{noise:.0%} over "
                    f"{r.repeats} repeats): the machine was busy or the difference is too small to measure"
                )
    return out


def _vm_hwm() -> int | None:
    """VmHWM in bytes where /proc reports it (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def peak_memory(device: torch.device) -> dict[str, int | None]:
    """Peak RSS of this process so far and, on CUDA, peak allocated GPU bytes.

    Linux: VmHWM of /proc/self/status, the peak of this program's own memory map. ru_maxrss is not
    used there because exec keeps the parent's high-water mark: a prune started from a 2 GB process
    (a test runner, a notebook) would report 2 GB whatever it used itself."""
    rss = _vm_hwm()
    if rss is None:  # macOS reports bytes, other Unixes KiB
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss *= 1 if sys.platform == "darwin" else 1024
    gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"peak_rss_bytes": int(rss), "peak_gpu_bytes": gpu}


def memory_lines(mem: dict[str, int | None]) -> list[str]:
    """`peak_memory`'s figures as the lines every run kind prints (prune report, eval, search)."""
    out = []
    if mem.get("peak_rss_bytes"):
        out.append(f"Peak resident memory (RSS) of the process: {mem['peak_rss_bytes'] / 2**30:.2f} GiB")
    if mem.get("peak_gpu_bytes"):
        out.append(f"Peak GPU memory allocated: {mem['peak_gpu_bytes'] / 2**30:.2f} GiB")
    return out
