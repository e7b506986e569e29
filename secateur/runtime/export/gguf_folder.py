"""GGUF from a pruned output folder without loading the model: the streamed export.

The folder's weightless skeleton (every layer cut to its recorded shape, `store/io.pruned_skeleton`)
decides the llama.cpp layout and the file's header; the tensors are then read one at a time from
the memory-mapped safetensors (`store/weights.SafetensorsSource`), converted by the same
per-tensor code as the in-memory export (`gguf.encoded`) and written before the next is read. The
file equals the one `write_gguf` makes from the loaded model byte for byte; resident memory is the
skeleton plus about one tensor (the largest, usually the embedding) instead of the whole model in
float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.runtime.export import ExportError
from secateur.runtime.export.gguf import GgufLayout, write_gguf
from secateur.runtime.store.folder import header_shapes
from secateur.runtime.store.formats import PrunedFolderError
from secateur.runtime.store.io import pruned_skeleton
from secateur.runtime.store.weights import SafetensorsSource, WeightSourceError


def folder_skeleton(folder: str | Path) -> tuple[nn.Module, ModelAdapter]:
    """A pruned folder's meta skeleton and adapter, its weight headers checked against it (every
    parameter present with the recorded shape) before anything is written."""
    folder = Path(folder)
    try:
        model = pruned_skeleton(folder)
        headers = header_shapes(folder)
    except PrunedFolderError as e:
        raise ExportError(str(e)) from e
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # the head is the embedding, as load_pruned ties it
    for name, p in model.named_parameters():
        got = headers.get(name)
        if got is None:
            raise ExportError(f"{folder}: the weights lack {name}")
        if tuple(got) != tuple(p.shape):
            raise ExportError(
                f"{folder}: {name} has shape {tuple(got)} in the weights but {tuple(p.shape)} in secateur.json"
            )
    return model, adapter_for(model.config)


def write_gguf_streamed(
    folder: str | Path,
    out: str | Path,
    tokenizer_gguf: str | Path,
    outtype: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
    dense_layer: Mapping[str, Any] | None = None,
) -> GgufLayout:
    """Write a pruned folder as GGUF reading one tensor at a time (the same file as loading it and
    calling `write_gguf`); refuses before writing what `write_gguf` refuses."""
    model, adapter = folder_skeleton(folder)
    try:
        source = SafetensorsSource(folder)
    except WeightSourceError as e:
        raise ExportError(str(e)) from e
    return write_gguf(
        model,
        adapter,
        out,
        tokenizer_gguf,
        outtype,
        name=name,
        overwrite=overwrite,
        dense_layer=dense_layer,
        read=source.get,
    )
