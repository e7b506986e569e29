"""Export of pruned models to inference engines: GGUF for llama.cpp, DeciLM checkpoints for vLLM.

Each writer first decides whether the engine can express the model exactly and refuses, naming
the layer and the reason, before anything is written; files appear atomically (temporary
sibling renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_shapes
from secateur.runtime.store.leftovers import new_partial_dir, release_partial_dir
from secateur.runtime.store.outdir import MANIFEST, apply_umask, check_file_replaceable, check_replaceable

FORMATS = ("gguf", "decilm")


class ExportError(ValueError):
    """A model the target engine cannot run exactly, or an export that cannot be written."""


def one_head_size_shapes(model: nn.Module, adapter: ModelAdapter, engine: str) -> list[dict[str, Any]]:
    """Every layer's shapes, refusing value heads narrower than query/key heads: neither llama.cpp nor
    vLLM has an attention with a separate value head size."""
    shapes = [layer_shapes(model, adapter, i) for i in range(adapter.num_layers)]
    for i, s in enumerate(shapes):
        if not s["skip_attention"] and s["v_head_dim"] != s["head_dim"]:
            raise ExportError(
                f"layer {i}: value heads are {s['v_head_dim']} wide but query/key heads {s['head_dim']} "
                f"(value-channel pruning, e.g. the fasp-vchannel recipes); {engine}'s attention needs one "
                "head size for q, k and v. Prune attention by kv_group or q_head to export"
            )
    return shapes


def check_replaceable_path(out: Path, overwrite: bool) -> None:
    """An existing export is replaced only with --overwrite and only when Secateur wrote it: a folder
    by its manifest, a file by its folder's `.secateur-files` (runtime/store/outdir.py)."""
    if out.is_dir() and not out.is_symlink():
        check_replaceable(out, overwrite)
    else:
        check_file_replaceable(out, overwrite)


@contextlib.contextmanager
def atomic_path(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling path (file or folder) that replaces `out` only if the block succeeds;
    a folder gets the manifest that lets a later --overwrite replace it."""
    check_replaceable_path(out, overwrite)
    tmp, entry = new_partial_dir(out.parent, f".{out.name}.tmp-{os.getpid()}-", f"export {out}")
    target = tmp / out.name
    try:
        yield target
        if target.is_dir():
            files = sorted(q.name for q in target.iterdir())
            (target / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
        apply_umask(tmp)
        check_replaceable_path(out, overwrite)  # nothing appeared in the meantime
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(target, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        release_partial_dir(tmp, entry)
