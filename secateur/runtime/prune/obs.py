"""OBS-style selection: remove the units whose loss the layer's least squares can best absorb.

A fixed score (||W_j|| * ||X_j||) judges each unit alone, before any restoration. Optimal Brain
Surgeon judges a unit by the reconstruction error it leaves *after* the remaining columns are
re-fitted: for a group of columns u of the consumer W with inverse (damped) Gram H^-1,

    err(u) = tr( W_u [H^-1]_uu^-1 W_u^T ),

and removing u updates the survivors exactly (W -= W_u [H^-1]_uu^-1 [H^-1]_u: and the same
Schur complement on H^-1). Removing greedily, one unit at a time with these updates, is the
structured OBS of SlimGPT / ZipLM; it sees that two correlated channels are redundant where a
per-unit score keeps both. The final weights come from `restore.restore_columns` on the kept set,
which is the same least-squares optimum.
"""

from __future__ import annotations

import torch

from secateur.graph.plan import Scoring


def _inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(G + lambda I)^-1 in float64 (small matrices; the greedy updates accumulate rounding)."""
    g = gram.to(torch.float64)
    lam = damping * float(g.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(g + lam * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        lam *= 10
    raise FloatingPointError("Gram matrix is not positive definite even with heavy damping")


def obs_remove(
    weight: torch.Tensor,
    gram: torch.Tensor,
    units: list[list[int]],
    n_keep: int,
    partitions: int = 1,
    damping: float = Scoring.damping,
) -> list[int]:
    """Kept unit indices after greedily removing, by OBS error, all but `n_keep` units.

    `units[u]` lists the consumer columns unit u owns (equal widths). With `partitions` > 1 the
    units are split in that many equal contiguous blocks (query heads per KV group) and each
    keeps `n_keep`; otherwise `n_keep` units are kept overall.
    """
    n = len(units)
    per = n // partitions
    quota = [per - n_keep] * partitions if partitions > 1 else [n - n_keep]
    if min(quota) < 0:
        raise ValueError(f"cannot keep {n_keep} of {per if partitions > 1 else n} units")
    w = weight.detach().to(torch.float64).clone()
    hinv = _inverse(gram, damping)
    cols = torch.tensor(units, dtype=torch.long, device=w.device)  # [n, width]
    alive = torch.ones(n, dtype=torch.bool)
    while sum(quota) > 0:
        best, best_err = -1, float("inf")
        for u in range(n):
            if not alive[u] or quota[u // per if partitions > 1 else 0] == 0:
                continue
            idx = cols[u]
            block = hinv[idx][:, idx]
            wu = w[:, idx]
            err = (
                float((wu @ torch.linalg.solve(block, wu.T)).trace())
                if idx.numel() > 1
                else float((wu.square().sum() / block.reshape(())).item())
            )
            if err < best_err:
                best, best_err = u, err
        idx = cols[best]
        block_inv = torch.linalg.inv(hinv[idx][:, idx])
        rows = hinv[idx]  # [width, in]
        w -= w[:, idx] @ block_inv @ rows
        hinv -= rows.T @ block_inv @ rows
        alive[best] = False
        quota[best // per if partitions > 1 else 0] -= 1
    return [u for u in range(n) if alive[u]]


def obs_remove_channels(
    weight: torch.Tensor, gram: torch.Tensor, n_keep: int, damping: float = 0.01
) -> list[int]:
    """`obs_remove` for single-column units (MLP channels), vectorised: one rank-1 update per removal."""
    n = weight.shape[1]
    w = weight.detach().to(torch.float64).clone()
    hinv = _inverse(gram, damping)
    alive = torch.ones(n, dtype=torch.bool, device=w.device)
    for _ in range(n - n_keep):
        d = hinv.diagonal()
        err = w.square().sum(0) / d
        err[~alive] = float("inf")
        j = int(torch.argmin(err))
        row = hinv[j] / hinv[j, j]
        w -= torch.outer(w[:, j], row)
        hinv -= torch.outer(hinv[:, j], row)
        hinv[j, j] = 1.0  # a removed column's diagonal stays positive (never chosen again)
        alive[j] = False
    return alive.nonzero().flatten().tolist()
