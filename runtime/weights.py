"""Weight sources read one tensor at a time: memory-mapped safetensors and GGUF files.

The streaming runtime never loads a whole model: it asks a source for the tensors of one decoder
layer, by their Hugging Face names, and drops them when the layer is done. Safetensors files
(one file or HF's sharded form with `model.safetensors.index.json`) are memory-mapped; GGUF
tensors are dequantised one at a time with the `gguf` package and put through the same
per-architecture fix-ups transformers applies when it loads a GGUF whole (q/k un-permutation for
LLaMA, Gemma's norm offsets), so a streamed tensor equals the one `from_pretrained` makes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

INDEX_NAME = "model.safetensors.index.json"


class WeightSourceError(ValueError):
    """A weight file that lacks a tensor the model needs, or cannot be read."""


class WeightSource(Protocol):
    """Tensors by Hugging Face name, read on demand."""

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class SafetensorsSource:
    """A folder's safetensors weights (single file or sharded with an index), memory-mapped."""

    def __init__(self, folder: str | Path) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise WeightSourceError(f"{index}: damaged index, no usable 'weight_map' ({e})") from e
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise WeightSourceError(f"{self.folder}: no safetensors weights")
        self._handles = {}
        for f in files:
            path = self.folder / f
            if not path.is_file():
                raise WeightSourceError(f"{index}: lists {f}, which is missing")
            try:
                self._handles[f] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own types for foreign or truncated files
                raise WeightSourceError(f"{path}: damaged or not a safetensors file ({e})") from e
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._where = weight_map

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise WeightSourceError(f"{self.folder}: no tensor {name!r} in the safetensors weights")
        return self._handles[self._where[name]].get_tensor(name)


class GGUFSource:
    """A GGUF file's tensors under their HF names, dequantised one at a time (file memory-mapped)."""

    def __init__(self, path: str | Path, skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
        )

        self.path = Path(path)
        parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        self._reader = GGUFReader(str(self.path))
        arch = str(bytes(self._reader.fields["general.architecture"].parts[-1]), "utf-8")
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
        gguf_to_hf = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._where = {hf: g for g, hf in gguf_to_hf.items() if g in self._tensors}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        if name not in self._where:
            raise WeightSourceError(f"{self.path}: no GGUF tensor maps to {name!r}")
        t = self._tensors[self._where[name]]
        res = self._processor.process(
            weights=dequantize(t.data, t.tensor_type),
            name=t.name,
            tensor_key_mapping={},
            parsed_parameters={},
        )
        return torch.from_numpy(np.copy(res.weights))


def check_complete(source: WeightSource, needed: list[str], tied: set[str], where: str) -> None:
    """Every tensor the model needs (tied aliases excepted) is in the source: fail before any work."""
    missing = [n for n in needed if n not in tied and n not in source.names()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightSourceError(f"{where}: the weights lack {shown}")
