"""`budget.multiple_of: auto`: the MLP width granularity the serving target runs fast.

For each candidate granularity c (8 ... 128) a probe with an MLP width that is an odd multiple of c
(aligned to c and to nothing coarser) is timed against the straight line through its two
neighbours aligned to 256; c is fast when neither prefill nor decode is more than `TOLERANCE`
above that line. The granularity chosen is the smallest c from which every coarser candidate is
fast, never finer than the GGUF quant type's block, and never coarser than an eighth of the dense
width (a coarser step leaves too few widths to allocate). Measured in llama.cpp f16 on a 2-core
AVX512 CPU, a width of 3432 (8-aligned) ran prefill at 0.97x dense where 3456 (128-aligned) ran
at 1.36x (issue 25), which is what this sweep detects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from secateur.runtime.speed.engines import EngineUnavailable
from secateur.runtime.speed.measure import Target, Timing, time_shapes
from secateur.runtime.speed.probe import ProbeShape
from secateur.runtime.speed.quant import row_block

CANDIDATES = (8, 16, 32, 64, 128)
ALIGNED = 256
TOLERANCE = 0.03
SWEEP_LAYERS = 4
SWEEP_VOCAB = 512  # the head is not what the sweep measures


@dataclass(frozen=True)
class SweepRow:
    granularity: int
    width: int
    prefill_ratio: float  # measured time / the aligned line's time at this width
    decode_ratio: float
    fast: bool


@dataclass(frozen=True)
class Sweep:
    """The chosen granularity, why (the rows), and the bounds it was clamped to."""

    multiple_of: int
    measured: int | None  # what the timings alone chose (None: no sweep needed)
    block: int
    cap: int
    rows: tuple[SweepRow, ...] = ()
    reference: tuple[int, int] = (0, 0)
    busy: bool = False  # timings too noisy to trust: the cap (coarsest step) is taken instead
    unavailable: str | None = None  # why the engine could not time anything (the cap is taken)

    def describe(self) -> str:
        """One line for progress, explain and the report."""
        if self.unavailable:
            why = f"not measured: {self.unavailable}; took the coarsest step {self.cap}"
        elif self.measured is None:
            why = f"no sweep: the MLP is too narrow for a step above {self.cap}"
        elif self.busy:
            why = f"sweep inconclusive (machine busy), took the coarsest step {self.cap}"
        else:
            why = f"sweep chose {self.measured}"
        return f"multiple_of {self.multiple_of} ({why}; quant block {self.block}, cap {self.cap})"


def width_cap(n_ff: int) -> int:
    """The largest power of two not above an eighth of the dense width (at least 8)."""
    c = 8
    while c * 2 <= n_ff // 8:
        c *= 2
    return c


def _odd_multiple(c: int, lo: int, hi: int) -> int:
    """The multiple of c nearest the middle of (lo, hi) that is not a multiple of 2c."""
    mid = (lo + hi) // 2
    k = max(1, round(mid / c))
    if k % 2 == 0:
        k += 1 if (k + 1) * c < hi else -1
    return k * c


def reference_widths(n_ff: int) -> tuple[int, int]:
    """Two 256-aligned widths around 70% of the dense width (where pruned widths land)."""
    lo = max(ALIGNED, int(0.7 * n_ff) // ALIGNED * ALIGNED)
    return lo, lo + ALIGNED


def sweep_rows(
    target: Target,
    dense: ProbeShape,
    progress: Callable[[str], None] | None = None,
    rounds: int | None = None,
) -> tuple[list[SweepRow], tuple[int, int], bool]:
    """Time the candidates and the aligned neighbours; a row per candidate."""
    lo, hi = reference_widths(dense.n_ff)
    base = dense.with_(n_layers=SWEEP_LAYERS, vocab=SWEEP_VOCAB)
    block = row_block(target.quant if target.engine == "llama.cpp" else None)
    # a quantised type holds rows of whole blocks only: finer candidates cannot even be written
    widths = {c: _odd_multiple(c, lo, hi) for c in CANDIDATES if c >= block}
    shapes = [base.with_(n_ff=w) for w in (lo, hi, *widths.values())]
    t = time_shapes(target, shapes, rounds, progress)
    t_lo, t_hi = t[shapes[0]], t[shapes[1]]
    rows = []
    for c, w in widths.items():
        got: Timing = t[base.with_(n_ff=w)]
        f = (w - lo) / (hi - lo)
        ratios = [got.phase(p) / ((1 - f) * t_lo.phase(p) + f * t_hi.phase(p)) for p in ("prefill", "decode")]
        rows.append(SweepRow(c, w, ratios[0], ratios[1], max(ratios) <= 1 + TOLERANCE))
    return rows, (lo, hi), any(x.busy for x in t.values())


def choose(rows: list[SweepRow]) -> int:
    """The smallest candidate from which every coarser one is fast (ALIGNED when none is)."""
    best = ALIGNED
    for r in sorted(rows, key=lambda r: -r.granularity):
        if not r.fast:
            break
        best = r.granularity
    return best


def auto_multiple_of(
    target: Target,
    dense: ProbeShape,
    progress: Callable[[str], None] | None = None,
    rounds: int | None = None,
) -> Sweep:
    """The granularity for `budget.multiple_of: auto` on `target` for a model of `dense` shapes."""
    block = row_block(target.quant if target.engine == "llama.cpp" else None)
    cap = width_cap(dense.n_ff)
    if cap <= CANDIDATES[0]:
        return Sweep(max(block, CANDIDATES[0]), None, block, cap)
    if block > CANDIDATES[-1]:  # (q4_k_m's 256) every candidate is finer than one block: nothing to sweep
        return Sweep(max(block, cap), None, block, cap)
    try:
        rows, ref, busy = sweep_rows(target, dense, progress, rounds)
    except EngineUnavailable as e:  # e.g. llama-cpp-python failed to build: safe widths, said so
        if progress:
            progress(f"width sweep: {e}; taking the coarsest step {cap}")
        return Sweep(max(block, cap), None, block, cap, unavailable=str(e).split(";")[0])
    measured = choose(rows)
    step = cap if busy else min(cap, measured)
    return Sweep(max(block, step), measured, block, cap, tuple(rows), ref, busy)
