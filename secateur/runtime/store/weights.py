"""Weight sources read one tensor at a time: memory-mapped safetensors and GGUF files.

The streaming runtime never loads a whole model: it asks a source for the tensors of one decoder
layer, by their Hugging Face names, and drops them when the layer is done. Safetensors files
(one file or HF's sharded form with `model.safetensors.index.json`) are memory-mapped; GGUF
tensors are dequantised one at a time with the `gguf` package and put through the same
per-architecture fix-ups transformers applies when it loads a GGUF whole (q/k un-permutation for
LLaMA, Gemma's norm offsets), so a streamed tensor equals the one `from_pretrained` makes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from secateur.runtime.store.folder import weight_files
from secateur.runtime.store.formats import PrunedFolderError


class WeightSourceError(ValueError):
    """A weight file that lacks a tensor the model needs, or cannot be read."""


class WeightSource(Protocol):
    """Tensors by Hugging Face name, read on demand (`mapped`: `get` returns views of the file's
    private memory map where no conversion is needed, so unread pages cost no memory)."""

    mapped: bool

    def names(self) -> set[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


_SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class SafetensorsSource:
    """A folder's safetensors weights (single file or sharded with an index), memory-mapped.

    Each read opens its file and closes it again: the tensor it returns keeps only its own mapping,
    so the pages of a layer already consumed leave resident memory when that layer is dropped (a
    handle kept open for the whole run would keep every page read so far resident, and the
    streaming peak would grow with depth). The tensors are views of a private (copy-on-write) map of
    the file: a page counts in resident memory once read, and a write never reaches the file."""

    mapped = True

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            files = weight_files(self.folder)  # the one listing of a folder's weights (index checked)
        except PrunedFolderError as e:
            raise WeightSourceError(str(e)) from e
        self._where: dict[str, Path] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as handle:
                    self._where.update(dict.fromkeys(handle.keys(), path))
            except Exception as e:  # safetensors raises its own types for foreign or truncated files
                raise WeightSourceError(f"{path}: damaged or not a safetensors file ({e})") from e

    def names(self) -> set[str]:
        return set(self._where)

    def stored_dtype(self, name: str) -> torch.dtype | None:
        """The dtype `name` is stored in (read from the header; None for one torch lacks)."""
        with safe_open(str(self._where[name]), framework="pt") as handle:
            code = handle.get_slice(name).get_dtype()
        return _SAFETENSORS_DTYPES.get(code)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise WeightSourceError(f"{self.folder}: no tensor {name!r} in the safetensors weights")
        path = self._where[name]
        try:
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(name)
        except OSError as e:
            raise WeightSourceError(f"{path}: cannot read {name!r} ({e})") from e


# Hugging Face model types whose gguf-py architecture name differs (as transformers maps them)
GGUF_ARCH_NAMES = {
    "gemma3_text": "gemma3",
    "cohere": "command-r",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}


class GGUFSource:
    """A GGUF file's tensors under their HF names, dequantised one at a time (file memory-mapped).

    The header is read with transformers' lazy GGUF reader (the tokenizer arrays are skipped, so
    opening a 7B file takes well under a second), names are mapped with gguf-py's tensor name map,
    and each tensor is dequantised by gguf-py and passed through transformers' per-architecture
    processor (q/k un-permutation, Gemma norm offsets), as `from_pretrained` does for a whole file."""

    mapped = False  # every tensor is a dequantised copy

    def __init__(self, path: str | Path, skeleton: nn.Module) -> None:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers.integrations.gguf import GgufHeader, load_gguf_state_dict
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self.path = Path(path)
        try:
            header = GgufHeader.from_file(str(self.path))
        except (ValueError, KeyError, IndexError) as e:
            raise WeightSourceError(f"{self.path}: not a readable GGUF file ({e})") from e
        self._tensors = load_gguf_state_dict(header)
        config = skeleton.config
        self._processor = TENSOR_PROCESSORS.get(header.architecture, TensorProcessor)(
            config={
                "num_attention_heads": getattr(config, "num_attention_heads", None),
                "num_key_value_heads": getattr(config, "num_key_value_heads", None),
            }
        )
        model_type = GGUF_ARCH_NAMES.get(config.model_type, config.model_type)
        arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == model_type), None)
        if arch is None:
            raise WeightSourceError(f"{self.path}: gguf-py has no tensor names for model type {model_type!r}")
        names = get_tensor_name_map(arch, config.num_hidden_layers)
        self._where = {}
        for hf in skeleton.state_dict():
            base, _, suffix = hf.rpartition(".")
            g = names.get_name(base)
            if g is not None and f"{g}.{suffix}" in self._tensors:
                self._where[hf] = f"{g}.{suffix}"

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        if name not in self._where:
            raise WeightSourceError(f"{self.path}: no GGUF tensor maps to {name!r}")
        gname = self._where[name]
        lazy = self._tensors[gname]
        rows = lazy.data.reshape(*lazy.shape[:-1], -1)  # the file's bytes, one row per output row
        res = self._processor.process(
            weights=dequantize(rows, GGMLQuantizationType(lazy.ggml_type)),
            name=gname,
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
