"""Reading a pruned folder without building a model: is it one, its config, its weight files
(the one reader, `weight_files`, every loader uses) and their tensor shapes from the headers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from secateur.runtime.store.formats import INDEX_NAME, WEIGHTS_NAME, PrunedFolderError
from secateur.runtime.store.refusal import REFUSED_ARCH_PREFIX


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PrunedFolderError(f"{path.parent}: {path.name} is missing; not a complete Secateur output")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise PrunedFolderError(f"{path}: damaged JSON ({e})") from e
    if not isinstance(data, dict):
        raise PrunedFolderError(f"{path}: expected a JSON object")
    return data


def is_pruned_folder(folder: str | Path) -> bool:
    """A Secateur output, or a folder a loaded pruned model was saved to with `save_pretrained`
    (its config.json names the real type in `secateur_model_type`)."""
    folder = Path(folder)
    if (folder / "secateur.json").is_file():
        return True
    cfg = folder / "config.json"
    try:
        return cfg.is_file() and "secateur_model_type" in json.loads(cfg.read_text())
    except (UnicodeDecodeError, ValueError):
        return False


def pruned_hf_config(folder: str | Path) -> Any:
    """The HF config of a pruned folder, with its real model type (config.json's may be a refusal)."""
    from transformers import AutoConfig

    folder = Path(folder)
    meta_file = folder / "secateur.json"
    meta = read_json(meta_file) if meta_file.is_file() else {}
    cfg = read_json(folder / "config.json")
    base = cfg.pop("secateur_model_type", None) or meta.get("model_type") or cfg.get("model_type")
    cfg["model_type"] = base
    if cfg.get("architectures"):
        cfg["architectures"] = [n.removeprefix(REFUSED_ARCH_PREFIX) for n in cfg["architectures"]]
    try:
        return AutoConfig.for_model(**cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise PrunedFolderError(f"{folder / 'config.json'}: not a usable {base!r} config ({e})") from e


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict) or not wmap:
            raise PrunedFolderError(f"{index}: no 'weight_map' of tensor names to shard files")
        names = sorted(set(wmap.values()))
        for n in names:
            if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors"):
                raise PrunedFolderError(f"{index}: {n!r} is not a shard file name in this folder")
            if not (folder / n).is_file():
                raise PrunedFolderError(f"{index}: shard {n} is missing")
        return [folder / n for n in names]
    if not (folder / WEIGHTS_NAME).is_file():
        raise PrunedFolderError(f"{folder}: {WEIGHTS_NAME} (or {INDEX_NAME} and its shards) is missing")
    return [folder / WEIGHTS_NAME]


def damaged(path: Path, e: Exception) -> PrunedFolderError:
    return PrunedFolderError(f"{path}: damaged or not a safetensors file ({e})")


def header_shapes(folder: str | Path) -> dict[str, list[int]]:
    """Every tensor's shape from the safetensors headers (no weights read)."""
    out: dict[str, list[int]] = {}
    for f in weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    out[k] = list(fh.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise damaged(f, e) from e
    return out
