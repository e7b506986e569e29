"""Lock files: everything needed to reproduce a pruned model exactly, and to check that you did."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from secateur.runtime.store.fingerprint import model_fingerprint as model_fingerprint
from secateur.runtime.store.fingerprint import model_fingerprint_v1
from secateur.runtime.store.fingerprint import tensor_fingerprint as tensor_fingerprint
from secateur.runtime.store.loader import DTYPES

LOCK_NAME = "recipe.lock.yaml"
LOCK_VERSION = 2  # 2: weight fingerprints hash tensor by tensor (streamed and in-memory runs agree)
# every version ever written re-applies: 1 is verified with its own fingerprint scheme
# (runtime.store.fingerprint.model_fingerprint_v1) and the re-applied run writes a version-2 lock
READABLE_VERSIONS = (1, 2)


def locked_fingerprint(
    lock_data: dict | None, model: nn.Module, dtype: torch.dtype | None, current: str
) -> str:
    """The fingerprint of `model` in the scheme `lock_data` recorded (`current` for the newest)."""
    if lock_data is not None and lock_data.get("lock_version") == 1:
        return model_fingerprint_v1(model, dtype)
    return current


class LockError(ValueError):
    """A lock that cannot be applied here (other model, malformed file)."""


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
    output_dtype: str | None = None,
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
        # the dtype the weights were saved (and fingerprinted) in; absent in older locks: `dtype`
        "output_dtype": output_dtype or dtype,
        # CPU matmuls reduce in a thread-count-dependent order: the same count is part of "bit-identical"
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


INDEX_KEYS = ("mlp", "kv_heads", "q_heads", "v_channels")
FLAG_KEYS = ("drop_attn", "drop_mlp")
FINGERPRINTS = ("model", "calibration", "pruned_model")


def read_lock(path: str | Path) -> dict[str, Any]:
    """Read a lock with yaml.safe_load and check its whole structure before any work."""
    p = Path(path)
    if not p.is_file():
        raise LockError(f"lock file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LockError(f"{p}: not valid YAML for a lock (python tags are refused): {e}") from e
    if not isinstance(data, dict) or data.get("lock_version") not in READABLE_VERSIONS:
        raise LockError(
            f"{p}: not a Secateur lock (lock_version {', '.join(map(str, READABLE_VERSIONS))} expected)"
        )
    for key in ("recipe", "kept", "fingerprints"):
        if key not in data:
            raise LockError(f"{p}: missing key {key!r}")
    if not isinstance(data["recipe"], dict):
        raise LockError(f"{p}: recipe: expected a mapping")
    fps = data["fingerprints"]
    if not isinstance(fps, dict):
        raise LockError(f"{p}: fingerprints: expected a mapping")
    for k in FINGERPRINTS:
        v = fps.get(k)
        if not (isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)):
            raise LockError(f"{p}: fingerprints.{k}: expected a sha256 hex digest, got {v!r}")
    out_dtype = data.get("output_dtype", data.get("dtype"))
    if out_dtype not in DTYPES:
        raise LockError(f"{p}: output_dtype: expected one of {', '.join(DTYPES)}, got {out_dtype!r}")
    check_kept(data["kept"], p)
    return data


def check_kept(kept: Any, path: Path) -> None:
    """kept: one mapping per stage of layer index -> kept indices (sorted, unique, >= 0) and flags."""
    if not isinstance(kept, list):
        raise LockError(f"{path}: kept: expected a list (one entry per stage), got {type(kept).__name__}")
    for si, stage in enumerate(kept):
        where = f"{path}: kept.{si}"
        if not isinstance(stage, dict):
            raise LockError(f"{where}: expected a mapping of layer index to kept units")
        for layer, keep in stage.items():
            if not (isinstance(layer, str) and layer.isdigit()):
                raise LockError(f"{where}: {layer!r} is not a layer index")
            if not isinstance(keep, dict):
                raise LockError(f"{where}.{layer}: expected a mapping")
            for key, value in keep.items():
                if key in FLAG_KEYS:
                    if not isinstance(value, bool):
                        raise LockError(f"{where}.{layer}.{key}: expected true or false, got {value!r}")
                    continue
                if key not in INDEX_KEYS:
                    raise LockError(
                        f"{where}.{layer}.{key}: unknown key (expected {', '.join(INDEX_KEYS + FLAG_KEYS)})"
                    )
                if not isinstance(value, list) or not all(type(v) is int for v in value):
                    raise LockError(f"{where}.{layer}.{key}: expected a list of integers")
                if any(v < 0 for v in value):
                    raise LockError(f"{where}.{layer}.{key}: negative index {min(value)}")
                if len(set(value)) != len(value):
                    raise LockError(f"{where}.{layer}.{key}: duplicated indices")


def check_kept_ranges(kept: list[dict[str, Any]], shapes: list[dict[str, Any]], path: Any) -> None:
    """Every locked index exists in the dense model (widths only shrink from stage to stage)."""
    limits = {
        "mlp": "intermediate_size",
        "kv_heads": "num_kv_heads",
        "q_heads": "num_heads",
    }
    for si, stage in enumerate(kept):
        for layer, keep in stage.items():
            i = int(layer)
            if i >= len(shapes):
                raise LockError(f"{path}: kept.{si}.{layer}: the model has {len(shapes)} layers")
            sh = shapes[i]
            bounds = {k: int(sh[v]) for k, v in limits.items()}
            bounds["v_channels"] = int(sh["num_kv_heads"]) * int(sh["v_head_dim"])
            for key, n in bounds.items():
                values = keep.get(key) or []
                if values and max(values) >= n:
                    raise LockError(
                        f"{path}: kept.{si}.{layer}.{key}: index {max(values)} is out of range (the layer has {n})"
                    )
