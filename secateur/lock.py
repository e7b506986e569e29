"""Lock files: everything needed to reproduce a pruned model exactly, and to check that you did."""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

LOCK_NAME = "recipe.lock.yaml"
LOCK_VERSION = 1


class LockError(ValueError):
    """A lock that cannot be applied here (other model, malformed file)."""


def tensor_fingerprint(tensors: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over names, shapes, dtypes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda x: x[0]):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """Fingerprint of a model's weights (tied tensors counted once)."""
    seen: set[int] = set()
    items = []
    for name, p in model.state_dict().items():
        if p.data_ptr() in seen and p.numel():
            continue
        seen.add(p.data_ptr())
        items.append((name, p))
    return tensor_fingerprint(items)


def versions() -> dict[str, str]:
    """Versions of the packages whose numerics shape the result."""
    out = {"python": platform.python_version()}
    for pkg in ("secateur", "torch", "transformers", "numpy", "optuna"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def build_lock(
    recipe: dict[str, Any],
    plans: list[dict[str, Any]],
    kept: list[dict[str, Any]],
    *,
    model_fp: str,
    calib_fp: str,
    device: str,
    dtype: str,
    result_fp: str,
) -> dict[str, Any]:
    """The lock document (plain data, YAML-safe)."""
    return {
        "lock_version": LOCK_VERSION,
        "recipe": recipe,
        "plans": plans,
        "kept": kept,
        "fingerprints": {"model": model_fp, "calibration": calib_fp, "pruned_model": result_fp},
        "seeds": {"calibration": recipe.get("calibration", {}).get("seed")},
        "device": device,
        "dtype": dtype,
        "versions": versions(),
    }


def read_lock(path: str | Path) -> dict[str, Any]:
    """Read a lock with yaml.safe_load and check its shape."""
    p = Path(path)
    if not p.is_file():
        raise LockError(f"lock file not found: {p}")
    data = yaml.safe_load(p.read_text())
    if not isinstance(data, dict) or data.get("lock_version") != LOCK_VERSION:
        raise LockError(f"{p}: not a Secateur lock (lock_version {LOCK_VERSION} expected)")
    for key in ("recipe", "kept", "fingerprints"):
        if key not in data:
            raise LockError(f"{p}: missing key {key!r}")
    return data
