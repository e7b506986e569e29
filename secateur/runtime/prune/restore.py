"""Least-squares restoration of a consuming layer after some of its input columns are removed.

Minimises ||W X - W' X_S||^2 over W': W' = W_S + W_P G_PS (G_SS + lambda I)^-1, where
G = X^T X, S the kept and P the pruned columns, lambda = damping * mean(diag G).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from secateur.graph.plan import Scoring


@dataclass
class Restored:
    """The new consuming weight (kept columns only) and relative output errors."""

    weight: torch.Tensor
    err_pruned: float  # relative error of simply dropping the columns
    err_restored: float  # relative error after restoration


def relative_error(w: torch.Tensor, w_new_full: torch.Tensor, gram: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 computed from the Gram matrix."""
    d = w - w_new_full
    num = ((d @ gram) * d).sum()
    den = ((w @ gram) * w).sum().clamp_min(1e-30)
    return float(num / den)


def _embed(w_s: torch.Tensor, keep: torch.Tensor, n_cols: int) -> torch.Tensor:
    full = torch.zeros(w_s.shape[0], n_cols, dtype=w_s.dtype, device=w_s.device)
    full[:, keep] = w_s
    return full


def _finite(t: torch.Tensor) -> bool:
    """No NaN or inf in `t`, without a boolean copy of it (max and min propagate NaN)."""
    return bool(torch.isfinite(t.amax()) and torch.isfinite(t.amin()))


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<A, B> (Frobenius), summed in float64."""
    return float(torch.sum(a * b, dtype=torch.float64))


def _factor_in_place(m: torch.Tensor, shift: float) -> torch.Tensor | None:
    """Cholesky factor of m + shift I computed in m's own memory (None if not positive definite).

    m is symmetric, so its transpose view is the same matrix in the column-major layout LAPACK
    factors in place: no copy of m, no identity matrix, the same factor as `cholesky(m + shift I)`."""
    m.diagonal().add_(shift)
    factor = m.mT
    info = torch.empty((), dtype=torch.int32, device=m.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    return factor if int(info) == 0 else None


def solve_factored(b: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """X with X L L^T = B (`cholesky_solve(B^T, L)^T`) as its two triangular solves: cholesky_solve
    copies the factor first (one more s x s matrix at the solve's peak); the bits are the same."""
    y = torch.linalg.solve_triangular(chol, b.T, upper=False)
    return torch.linalg.solve_triangular(chol.mT, y, upper=True).T


def _solve_shifted(
    a: torch.Tensor, b: torch.Tensor, damping: float, fresh: Callable[[], torch.Tensor] | None = None
) -> tuple[torch.Tensor, float]:
    """X (A + shift I) = B with shift = lambda * mean(diag A), and the shift used. Cholesky in fp32,
    fp64 if that fails, then ten times the damping. With `fresh`, `a` is the caller's own copy and is
    overwritten by its factor (`fresh()` rebuilds it for a retry); else `a` is copied first."""
    if not _finite(a):
        raise FloatingPointError("Gram matrix has NaN or inf entries")
    mean_diag = float(a.diagonal().mean().clamp_min(1e-12))
    m: torch.Tensor | None = a if fresh is not None else None
    fresh = fresh or a.clone
    lam = damping
    for attempt in range(8):
        for dtype in (torch.float32, torch.float64):
            m = (fresh() if m is None else m).to(dtype)
            chol = _factor_in_place(m, lam * mean_diag)
            m = None  # overwritten: the next try starts from a fresh copy
            if chol is not None:
                if attempt:
                    warnings.warn(f"ill-conditioned Gram matrix: damping raised to {lam:g}", stacklevel=4)
                return solve_factored(b.to(dtype), chol).to(b.dtype), lam * mean_diag
        lam *= 10
    raise FloatingPointError("Gram matrix is not positive definite even with heavy damping")


class _KeptGram:
    """G_SS (kept rows and columns of G) built inside G's own memory, for a caller that gives G up:
    the solve then holds one n x n buffer instead of G and a separate s x s copy (0.86 GiB for a
    7B MLP). The factor overwrites G_SS, so the upper triangle that Cholesky reads (row-major;
    the solve factors the transposed view) is kept packed in the buffer's spare tail, or in a
    tensor of its own where that is short, and `fresh` rebuilds G_SS from it for a retry."""

    def __init__(self, g: torch.Tensor, keep: torch.Tensor, block: int = 256) -> None:
        s = keep.numel()
        flat = g.view(-1)
        for a in range(0, s, block):  # row a of G_SS goes to flat[a*s:], below row keep[a] >= a of G
            rows = g.index_select(0, keep[a : a + block]).index_select(1, keep)
            flat[a * s : a * s + rows.numel()].copy_(rows.view(-1))
        self.m = flat[: s * s].view(s, s)
        need = s * (s + 1) // 2
        spare = flat[s * s : s * s + need]
        self.packed = spare if spare.numel() == need else torch.empty(need, dtype=g.dtype, device=g.device)
        self.block = block
        for a, off in self._rows():
            self.packed[off : off + s - a].copy_(self.m[a, a:])

    def _rows(self) -> Iterator[tuple[int, int]]:
        s = self.m.shape[0]
        return ((a, a * s - a * (a - 1) // 2) for a in range(s))

    def fresh(self) -> torch.Tensor:
        """G_SS again in the same memory: the packed upper triangle, mirrored below the diagonal."""
        m, s = self.m, self.m.shape[0]
        for a, off in self._rows():
            m[a, a:].copy_(self.packed[off : off + s - a])
        for a in range(0, s, self.block):
            b = min(a + self.block, s)
            m[a:b, :a].copy_(m[:a, a:b].T)
            square = m[a:b, a:b]
            square.copy_(square.triu() + square.triu(1).T)
        return m


def solve_damped(a: torch.Tensor, b: torch.Tensor, damping: float) -> torch.Tensor:
    """Solve X (A + lambda I) = B for X by Cholesky: fp32 first, fp64 if that fails, then more damping."""
    return _solve_shifted(a, b, damping)[0]


def restore_columns(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: torch.Tensor,
    damping: float = Scoring.damping,
    solve: bool = True,
    errors: bool = True,
    cross: torch.Tensor | None = None,
    ref_energy: torch.Tensor | None = None,
    strength: float = 1.0,
    consume: bool = False,
) -> Restored:
    """Restored kept-column weight for a consuming layer; falls back to plain slicing on failure.

    `consume=True` gives `gram` up to the solve: G_SS is built and factored inside it (`_KeptGram`),
    so it holds garbage afterwards; the result is the same bit for bit.

    `errors=False` skips the reconstruction errors (a search trial does not need them).
    With `cross` = X_ref^T X (and `ref_energy` = ||X_ref W^T||^2) the target is the dense stream's
    output W X_ref instead of W X (error-correcting restoration, see `restore_toward`).

    Cost for rows r, kept s and pruned p columns: the right-hand side W_P G_PS (2rps), the errors
    (2rs^2 + 2rp^2, from blocks of G: no product with the whole Gram) and the solve (s^3/3 + 2rs^2);
    memory beside G: one s x s matrix (G_SS, factored in place) and a few r x s ones.
    """
    if cross is not None and ref_energy is not None:
        return restore_toward(weight, gram, cross, ref_energy, keep, damping, solve, errors, strength)
    dev = weight.device
    w = weight.detach().to(torch.float32)
    g = gram.to(torch.float32)
    n = w.shape[1]
    mask = torch.ones(n, dtype=torch.bool, device=dev)
    mask[keep] = False
    pruned = mask.nonzero().flatten()
    keep = keep.to(dev)
    w_s, w_p = w[:, keep], w[:, pruned]
    rows = keep[:, None]
    energy = _Energy(w_s, w_p, g, pruned) if errors and _finite(g) else None
    rhs = w_p @ g[pruned[:, None], keep]
    del w, w_p  # not needed past here: the solve's peak holds W_S, the right-hand side and two solves
    solving = solve and pruned.numel() > 0
    kept = _KeptGram(g, keep) if consume and solving and g.is_contiguous() else None
    g_ss = kept.m if kept is not None else g[rows, keep]
    err_pruned = energy.pruned(g_ss, rhs) if energy is not None else float("nan")
    if not solving:
        return Restored(w_s.to(weight.dtype), err_pruned, err_pruned)
    fresh = kept.fresh if kept is not None else lambda: g[rows, keep]
    try:
        delta, shift = _solve_shifted(g_ss, rhs, damping, fresh)
    except FloatingPointError as e:
        warnings.warn(f"restoration skipped: {e}", stacklevel=2)
        return Restored(w_s.to(weight.dtype), err_pruned, err_pruned)
    del g_ss
    w_new = w_s + delta
    if not torch.isfinite(w_new).all():
        warnings.warn("restoration produced non-finite weights; keeping the unrestored slice", stacklevel=2)
        return Restored(w_s.to(weight.dtype), err_pruned, err_pruned)
    err = energy.restored(rhs, delta, shift) if energy is not None else float("nan")
    return Restored(w_new.to(weight.dtype), err_pruned, err)


class _Energy:
    """Relative output errors of a column restoration from blocks of the Gram matrix.

    With R = W_P G_PS and the restored W' = W_S + D, D (G_SS + shift I) = R:
    ||W X||^2 = tr(W_P G_PP W_P^T) + 2 <W_S, R> + tr(W_S G_SS W_S^T), the slice's error
    ||W_P X_P||^2 = tr(W_P G_PP W_P^T), and the restored error ||W_P X_P - D X_S||^2 =
    tr(W_P G_PP W_P^T) - <R, D> - shift ||D||^2 (since D G_SS = R - shift D)."""

    def __init__(self, w_s: torch.Tensor, w_p: torch.Tensor, g: torch.Tensor, pruned: torch.Tensor) -> None:
        self.w_s = w_s
        self.own = _dot(w_p @ g[pruned[:, None], pruned], w_p)  # tr(W_P G_PP W_P^T)
        self.total = 0.0

    def pruned(self, g_ss: torch.Tensor, rhs: torch.Tensor) -> float:
        """The slice's relative error; sets ||W X||^2 (from G_SS, before the solve overwrites it)."""
        self.total = max(self.own + 2 * _dot(self.w_s, rhs) + _dot(self.w_s @ g_ss, self.w_s), 1e-30)
        return self.own / self.total

    def restored(self, rhs: torch.Tensor, delta: torch.Tensor, shift: float) -> float:
        return max(self.own - _dot(rhs, delta) - shift * _dot(delta, delta), 0.0) / self.total


def _solved(
    dtype: torch.dtype,
    w_s: torch.Tensor,
    rhs: Callable[[], torch.Tensor],
    g_ss: Callable[[], torch.Tensor],
    damping: float,
    err_pruned: float,
    error: Callable[[torch.Tensor], float] | None,
) -> Restored:
    """W' = W_S + rhs (G_SS + lambda I)^-1 (G_SS built by `g_ss` and factored in place), falling back
    to the plain slice (with a warning) when the solve fails or gives non-finite weights; `error`
    measures the restored weight."""
    try:
        w_new = w_s + _solve_shifted(g_ss(), rhs(), damping, g_ss)[0]
    except FloatingPointError as e:
        warnings.warn(f"restoration skipped: {e}", stacklevel=3)
        return Restored(w_s.to(dtype), err_pruned, err_pruned)
    if not torch.isfinite(w_new).all():
        warnings.warn("restoration produced non-finite weights; keeping the unrestored slice", stacklevel=3)
        return Restored(w_s.to(dtype), err_pruned, err_pruned)
    return Restored(w_new.to(dtype), err_pruned, error(w_new) if error is not None else float("nan"))


def compensate_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """FLAP's bias compensation: the pruned inputs' mean contribution W_P E[X_P] moves into the bias."""
    n = weight.shape[1]
    mask = torch.ones(n, dtype=torch.bool, device=weight.device)
    mask[keep.to(weight.device)] = False
    extra = weight.detach().float()[:, mask] @ mean.to(weight.device).float()[mask]
    base = bias.detach().float() if bias is not None else torch.zeros_like(extra)
    return (base + extra).to(weight.dtype)


def _cross_error(
    w: torch.Tensor, w_s: torch.Tensor, keep: torch.Tensor, g: torch.Tensor, c: torch.Tensor, ref: float
) -> float:
    """||W X_ref - W' X_S||^2 / ||W X_ref||^2 from the Gram and cross matrices and ||W X_ref||^2."""
    mixed = ((w @ c[:, keep]) * w_s).sum()
    own = ((w_s @ g[keep][:, keep]) * w_s).sum()
    return float((ref - 2 * mixed + own) / max(ref, 1e-30))


def restore_toward(
    weight: torch.Tensor,
    gram: torch.Tensor,
    cross: torch.Tensor,
    ref_energy: torch.Tensor | float,
    keep: torch.Tensor,
    damping: float = Scoring.damping,
    solve: bool = True,
    errors: bool = True,
    strength: float = 1.0,
) -> Restored:
    """Error-correcting restoration: the kept columns fitted to the DENSE model's output.

    Minimises ||W X_ref - W' X_S||^2 + lambda ||W' - W_S||^2 with X the pruned stream's inputs and
    X_ref the dense stream's (same tokens): W' = W_S + (W C_{:,S} - W_S G_SS)(G_SS + lambda I)^-1,
    C = X_ref^T X. When the streams agree (C = G) this is the plain restoration; with nothing
    pruned and no upstream error it returns W exactly; otherwise each layer also absorbs what the
    layers before it lost.
    """
    dev = weight.device
    w = weight.detach().to(torch.float32)
    g, c = gram.to(torch.float32), cross.to(torch.float32)
    ref = float(ref_energy)
    if strength != 1.0:  # target W (a X_ref + (1 - a) X): part of the way toward the dense stream
        a = float(strength)
        own, mixed = float(((w @ g) * w).sum()), float(((w @ c) * w).sum())
        ref = a * a * ref + (1 - a) ** 2 * own + 2 * a * (1 - a) * mixed
        c = a * c + (1 - a) * g
    keep = keep.to(dev)
    w_s = w[:, keep]
    finite = bool(torch.isfinite(g).all() and torch.isfinite(c).all())
    err_pruned = _cross_error(w, w_s, keep, g, c, ref) if errors and finite else float("nan")
    if not solve:
        return Restored(w_s.to(weight.dtype), err_pruned, err_pruned)
    return _solved(
        weight.dtype,
        w_s,
        lambda: w @ c[:, keep] - w_s @ g[keep[:, None], keep],
        lambda: g[keep[:, None], keep],
        damping,
        err_pruned,
        (lambda w_new: _cross_error(w, w_new, keep, g, c, ref)) if errors else None,
    )
