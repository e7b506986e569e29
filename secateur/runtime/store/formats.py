"""The types, constants and errors several runtime modules share: dtype names, where a model's
files are, a loaded model, the load error, and the engine-unavailable error.

A leaf (it imports no other runtime module), so `loader` can import `io` and `stream` at module
top while they use these names without importing `loader` back, and `speed.engines` can import
`export.llamacpp` while it raises `EngineUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class PrunedFolderError(ValueError):
    """A pruned-model folder that is missing files or holds damaged ones."""


class ModelLoadError(ValueError):
    """A model reference, dtype or device that cannot be used; raised before weights load."""


class EngineUnavailable(RuntimeError):
    """The target engine cannot run on this machine (package missing, no device, or it crashed)."""


@dataclass
class ModelSource:
    """Where a model's files are: a folder or hub id, plus an optional GGUF file inside it."""

    ref: str
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass
class LoadedModel:
    """A model with its adapter, tokenizer and where it came from."""

    model: nn.Module
    adapter: ModelAdapter
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    stream: Any = None  # a runtime.store.stream.StreamedModel when the layers stay on disk (Any: a leaf)
