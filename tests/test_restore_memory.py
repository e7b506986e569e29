"""Least-squares restoration that consumes its Gram matrix: G_SS built and factored inside G's own
memory (one n x n buffer at the solve's peak, not G plus an s x s copy), with the same result."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import pytest
import torch

from secateur.runtime.prune.restore import restore_columns, solve_factored


def _case(n: int, r: int, kept: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    keep = torch.sort(torch.randperm(n, generator=g)[: int(n * kept)]).values
    return torch.randn(r, n, generator=g), x.T @ x, keep


def _same(a, b) -> None:
    assert torch.equal(a.weight, b.weight)
    assert (a.err_pruned, a.err_restored) == (b.err_pruned, b.err_restored)


# kept fractions whose packed triangle fits the buffer's spare tail (0.3, 0.8) and ones it does not (0.95)
@pytest.mark.parametrize("kept", [0.3, 0.8, 0.95])
def test_consuming_the_gram_gives_the_same_restoration(kept: float) -> None:
    w, gram, keep = _case(300, 24, kept)
    _same(restore_columns(w, gram, keep), restore_columns(w, gram.clone(), keep, consume=True))


def test_consuming_an_asymmetric_gram_reads_the_same_triangle() -> None:
    """A BLAS X^T X need not be symmetric to the bit; the solve reads one triangle either way."""
    w, gram, keep = _case(200, 16, 0.7)
    gram = gram + torch.triu(torch.full_like(gram, 1e-3), 1)  # upper and lower now differ
    _same(restore_columns(w, gram, keep), restore_columns(w, gram.clone(), keep, consume=True))


def test_a_retried_solve_rebuilds_the_kept_gram_exactly() -> None:
    """An indefinite Gram: Cholesky fails in fp32 and fp64 until the damping grows, each retry from a
    fresh G_SS (rebuilt from the packed triangle when the Gram is consumed)."""
    w, gram, keep = _case(120, 8, 0.5)
    gram -= 0.5 * gram.diagonal().mean() * torch.eye(120)
    out, said = [], []
    for consume in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out.append(restore_columns(w, gram.clone(), keep, damping=1e-4, consume=consume))
        said.append([str(c.message) for c in caught])
    assert said[0] == said[1] and said[0][0].startswith("ill-conditioned Gram matrix: damping raised to")
    _same(*out)


def _vm(key: str) -> int:
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_consuming_the_gram_allocates_no_kept_gram() -> None:
    """n = 4096, 80% kept: G_SS alone is 41 MiB; the consuming solve's peak stays well under it."""
    w, gram, keep = _case(4096, 16, 0.8)
    s = keep.numel()
    restore_columns(w, gram.clone(), keep, consume=True)  # first-use allocations out of the way
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start = _vm("VmRSS")
    restore_columns(w, gram, keep, consume=True)
    assert _vm("VmHWM") - start < s * s * 4 / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_triangular_solves_equal_cholesky_solve(dtype: torch.dtype) -> None:
    """What the restoration used before (cholesky_solve, which copies its factor), to the bit."""
    for s, r in [(257, 31), (1531, 700)]:
        w, gram, _ = _case(s, r, 1.0)
        gram.diagonal().add_(0.01 * gram.diagonal().mean())
        chol = torch.linalg.cholesky(gram.to(dtype))
        b = w.to(dtype)
        assert torch.equal(solve_factored(b, chol), torch.cholesky_solve(b.T, chol).T)
