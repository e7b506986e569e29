"""GGUF for llama.cpp, written with the `gguf` package.

A uniform Llama-family model becomes llama.cpp's `llama` architecture; one with per-layer shapes
(MLP widths, KV or query heads, removed branches) becomes `deci`, whose loader reads
`head_count`, `head_count_kv` and `feed_forward_length` as per-layer arrays. Qwen2/Qwen3 have only
a uniform architecture in llama.cpp. Two details of llama.cpp's deci code (checked in the source
llama-cpp-python 0.3.36 vendors, src/models/deci.cpp and llama-model.cpp) shape the layout:

- head dims are derived only when layer 0 has heads (`if (hparams.n_head() > 0)`), so a removed
  attention branch in layer 0 is written as one all-zero head (an exact zero contribution);
- a layer with `feed_forward_length` 0 `continue`s before its residual add, dropping that layer's
  attention output too, so a removed MLP behind a kept attention branch is written as one zero
  channel (exact). A layer with both branches removed keeps 0 / 0 (an identity).

llama.cpp's `llama` and `deci` rotate query/key pairs (2i, 2i+1) where HF rotates (i, i + d/2),
so q/k rows are permuted per head as llama.cpp's own converter does. Tokenizer metadata is copied
from a GGUF of the source model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.graph.groups import layer_shapes
from secateur.runtime.export import ExportError, atomic_path, one_head_size_shapes
from secateur.runtime.speed.quant import (
    LLAMA_QUANTISED,
    QuantWidthError,
    check_row_lengths,
    row_block,
    write_quantised,
)

Q = gguf.GGMLQuantizationType
OUTTYPES: dict[str, Any] = {
    "f32": Q.F32,
    "f16": Q.F16,
    "bf16": Q.BF16,
    "q8_0": Q.Q8_0,
    "q4_0": Q.Q4_0,
    "q4_k_m": None,
}
FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
}
_QKV = frozenset({"attn_q", "attn_k", "attn_v"})
_LLAMA_BIASES = _QKV | {"attn_output", "ffn_gate", "ffn_up", "ffn_down"}


@dataclass(frozen=True)
class ArchSpec:
    """What one llama.cpp architecture accepts (read from its load_arch_tensors)."""

    rope_pairs_adjacent: bool  # NORM rope: q/k rows must be permuted from HF's rotate_half order
    per_layer: bool  # reads head/KV-head/FFN counts per layer
    bias_slots: frozenset[str]  # tensors whose optional ".bias" the architecture loads


ARCHES = {
    "llama": ArchSpec(True, False, _LLAMA_BIASES),
    "deci": ArchSpec(True, True, _LLAMA_BIASES),
    "qwen2": ArchSpec(False, False, _QKV),
    "qwen3": ArchSpec(False, False, _QKV),
}


@dataclass
class LayerLayout:
    """One decoder layer as llama.cpp will see it."""

    n_head: int
    n_head_kv: int
    n_ff: int
    zero_attention: bool = False  # removed branch written as one all-zero head
    zero_mlp: bool = False  # removed branch written as one all-zero channel


@dataclass
class GgufLayout:
    """The architecture and per-layer counts a model is written with."""

    arch: str
    head_dim: int
    layers: list[LayerLayout] = field(default_factory=list)

    def counts(self, key: str) -> int | list[int]:
        """One value when every layer agrees (the plain `llama` key), else the per-layer array."""
        values = [getattr(lay, key) for lay in self.layers]
        return values[0] if not ARCHES[self.arch].per_layer else values


def _rope_theta(config: Any) -> float:
    """RoPE base; refuses scaled RoPE variants llama.cpp would need extra tensors or keys for."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportError(f"config rope type {kind!r}: only plain RoPE is exported to GGUF so far")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ExportError("config has no rope_theta")
    return float(theta)


def gguf_layout(model: nn.Module, adapter: ModelAdapter) -> GgufLayout:
    """Decide how llama.cpp can hold the model exactly, or refuse naming the layer and the reason."""
    cfg = adapter.config
    mt = cfg.model_type
    shapes = one_head_size_shapes(model, adapter, "llama.cpp")
    first = shapes[0]
    uniform = all(s == first for s in shapes) and not first["skip_attention"] and not first["skip_mlp"]
    arch = adapter.gguf_arch(heterogeneous=not uniform)
    if arch is None:
        if adapter.gguf_arch(heterogeneous=False) is None:
            raise ExportError(f"model_type {mt!r}: no llama.cpp architecture is mapped for GGUF export")
        i = next(i for i, s in enumerate(shapes) if s != first or s["skip_attention"] or s["skip_mlp"])
        raise ExportError(
            f"layer {i}: shape {_brief(shapes[i])} differs from layer 0 ({_brief(first)}) or removes a branch; "
            f"llama.cpp's {adapter.gguf_arch(False)} architecture reads one width for all layers (only the "
            "Llama family has a per-layer architecture, deci)"
        )
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise ExportError(
            f"config sliding_window {window}: llama.cpp's {arch} architecture has no sliding-window attention"
        )
    _rope_theta(cfg)
    last = len(shapes) - 1
    layers = []
    for i, s in enumerate(shapes):
        lay = LayerLayout(int(s["num_heads"]), int(s["num_kv_heads"]), int(s["intermediate_size"]))
        if s["skip_attention"] and i == 0:
            lay.n_head, lay.n_head_kv, lay.zero_attention = 1, 1, True
        if s["skip_mlp"] and (not s["skip_attention"] or i == 0 or i == last):
            lay.n_ff, lay.zero_mlp = 1, True
        layers.append(lay)
    return GgufLayout(arch, adapter.head_dim, layers)


def _brief(s: dict[str, Any]) -> str:
    return (
        f"heads {s['num_heads']}, kv heads {s['num_kv_heads']}, mlp {s['intermediate_size']}"
        + (", attention removed" if s["skip_attention"] else "")
        + (", mlp removed" if s["skip_mlp"] else "")
    )


def read_tokenizer_fields(path: str | Path) -> list[tuple[str, Any, Any, Any]]:
    """`tokenizer.*` metadata of a GGUF file as (key, value, type, array item type).

    Parsing a 49k-token vocabulary takes GGUFReader seconds, so results are kept per file version."""
    p = Path(path).resolve()
    try:
        stat = p.stat()
    except OSError as e:
        raise ExportError(f"{path}: cannot read the tokenizer GGUF ({e.strerror})") from e
    return list(_tokenizer_fields(p, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _tokenizer_fields(path: Path, _mtime: int, _size: int) -> tuple[tuple[str, Any, Any, Any], ...]:
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable GGUF file ({e})") from e
    out = []
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
            out.append((key, f.contents(), f.types[0], sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ExportError(f"{path}: has no tokenizer.ggml.tokens; give a GGUF of the source model")
    return tuple(out)


def check_tokenizer(model: nn.Module, tokenizer_gguf: str | Path) -> list[tuple[str, Any, Any, Any]]:
    """The tokenizer fields, refused when their vocabulary does not match the model's embedding."""
    tok = read_tokenizer_fields(tokenizer_gguf)
    n_tokens = len(next(v for k, v, *_ in tok if k == "tokenizer.ggml.tokens"))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    if n_tokens != vocab:
        raise ExportError(
            f"{tokenizer_gguf}: its tokenizer has {n_tokens} tokens but the model's embedding has {vocab} rows"
        )
    return tok


def _permute_rope(w: np.ndarray, head_dim: int) -> np.ndarray:
    """HF rotate_half row order -> llama.cpp's adjacent pairs, per head (weights or biases)."""
    rest = w.shape[1:]
    return w.reshape(-1, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _qtype(shape: tuple[int, ...], outtype: str) -> Any:
    """Norms and biases stay f32 (as llama.cpp's converter does); matrices in the out type, a
    quantised type falling back to f16 where a row the dense model already had is not a whole
    number of blocks (`check_quant_rows` has refused such rows that pruning made)."""
    qtype = OUTTYPES[outtype]
    if len(shape) == 1:
        return Q.F32
    if qtype in (Q.Q8_0, Q.Q4_0) and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return Q.F16
    return qtype


def check_quant_rows(
    model: nn.Module, adapter: ModelAdapter, outtype: str, dense_layer: Mapping[str, Any] | None = None
) -> None:
    """Refuse, before anything is written, a pruned row length `outtype` cannot hold: the down
    projection reads the MLP width, the attention output the kept heads times the head dim.
    `dense_layer`: the dense model's layer shapes (a run's report.json records them); without it the
    config's sizes stand for the dense ones, which a uniform output's config.json has replaced by the
    pruned sizes (its odd widths then passed as the dense model's and were silently written in f16)."""
    if row_block(outtype) == 1:
        return
    cfg = adapter.config
    d = dense_layer or {}
    dense = {
        "ffn_down": int(d.get("intermediate_size") or cfg.intermediate_size),
        "attn_output": int(d["num_heads"]) * int(d.get("v_head_dim") or d["head_dim"])
        if d.get("num_heads") and (d.get("v_head_dim") or d.get("head_dim"))
        else int(cfg.num_attention_heads) * adapter.head_dim,
    }
    for i in range(adapter.num_layers):
        s = layer_shapes(model, adapter, i)
        rows = {}
        if not s["skip_mlp"]:
            rows[f"blk.{i}.ffn_down"] = int(s["intermediate_size"])
        if not s["skip_attention"]:
            rows[f"blk.{i}.attn_output"] = int(s["num_heads"]) * int(s["v_head_dim"])
        dense_rows = {k: dense[k.split(".")[-1]] for k in rows}
        try:
            check_row_lengths(rows, dense_rows, outtype)
        except QuantWidthError as e:
            raise ExportError(str(e)) from e


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its GGUF name, logical shape and type, and where its values come from
    (a model parameter by HF name, or a constant filler standing for a removed branch)."""

    name: str
    shape: tuple[int, ...]
    qtype: Any
    source: str | None = None  # the HF parameter; None: filled with `fill`
    fill: float = 0.0
    permute: bool = False  # q/k rows into llama.cpp's rope pair order

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)))


def tensor_plan(
    model: nn.Module, adapter: ModelAdapter, layout: GgufLayout, outtype: str
) -> list[PlannedTensor]:
    """Every tensor in file order, from the model's parameter shapes alone (a meta skeleton will do),
    so the header can be written before any weight is read. Refuses a parameter llama.cpp cannot load."""
    spec = ARCHES[layout.arch]
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[layout.arch]
    names = gguf.get_tensor_name_map(arch_enum, adapter.num_layers)
    rope_rows = set()
    for i in range(adapter.num_layers):
        rope_rows |= {
            f"{adapter.layer_prefix(i)}.{m}.{p}" for m in (adapter.q, adapter.k) for p in ("weight", "bias")
        }
    plan: list[PlannedTensor] = []
    for name, p in model.named_parameters():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{name}: no GGUF tensor name in llama.cpp's {layout.arch} architecture")
        if new.endswith(".bias") and new.split(".")[-2] not in spec.bias_slots:
            raise ExportError(
                f"{name}: llama.cpp's {layout.arch} architecture has no bias on {new[: -len('.bias')]} "
                "(FLAP's bias compensation adds biases on o_proj and down_proj, which only the Llama "
                "family's llama/deci architectures load)"
            )
        shape = tuple(int(n) for n in p.shape)
        permute = spec.rope_pairs_adjacent and name in rope_rows
        plan.append(PlannedTensor(new, shape, _qtype(shape, outtype), name, permute=permute))
    hidden, hd = adapter.hidden_size, layout.head_dim
    fillers: list[tuple[str, tuple[int, ...], float]] = []
    for i, lay in enumerate(layout.layers):
        if lay.zero_attention:
            fillers.append((f"blk.{i}.attn_norm.weight", (hidden,), 1.0))
            fillers += [(f"blk.{i}.{t}.weight", (hd, hidden), 0.0) for t in ("attn_q", "attn_k", "attn_v")]
            fillers.append((f"blk.{i}.attn_output.weight", (hidden, hd), 0.0))
        if lay.zero_mlp:
            fillers.append((f"blk.{i}.ffn_norm.weight", (hidden,), 1.0))
            fillers += [(f"blk.{i}.{t}.weight", (1, hidden), 0.0) for t in ("ffn_gate", "ffn_up")]
            fillers.append((f"blk.{i}.ffn_down.weight", (hidden, 1), 0.0))
    plan += [PlannedTensor(n, shape, _qtype(shape, outtype), fill=v) for n, shape, v in fillers]
    return plan


Reader = Callable[[str], torch.Tensor]


CHUNK_BYTES = 64 * 2**20  # float32 rows converted at once: a 7B embedding is 2.2 GB in float32


def encoded(t: PlannedTensor, read: Reader, head_dim: int) -> np.ndarray:
    """One tensor's bytes as the file holds them: read (any dtype, upcast to float32 exactly),
    permuted if it is a q/k projection, converted to its GGUF type. Every GGUF type here encodes
    each row on its own, so a large matrix is converted a block of rows at a time (the same bytes)
    and never whole in float32."""
    if t.source is None:
        return gguf.quants.quantize(np.full(t.shape, t.fill, np.float32), t.qtype)
    value = read(t.source).detach()
    if tuple(value.shape) != t.shape:
        raise ExportError(f"{t.source}: the weights hold shape {tuple(value.shape)}, the model {t.shape}")
    if t.permute:
        return gguf.quants.quantize(_permute_rope(_f32(value), head_dim), t.qtype)
    step = max(1, CHUNK_BYTES // (4 * max(1, int(np.prod(t.shape[1:])))))
    if len(t.shape) < 2 or t.shape[0] <= step:
        return gguf.quants.quantize(_f32(value), t.qtype)
    first = gguf.quants.quantize(_f32(value[:step]), t.qtype)
    out = np.empty((t.shape[0], *first.shape[1:]), first.dtype)
    out[:step] = first
    for r in range(step, t.shape[0], step):
        out[r : r + step] = gguf.quants.quantize(_f32(value[r : r + step]), t.qtype)
    return out


def _f32(value: torch.Tensor) -> np.ndarray:
    return value.to("cpu", torch.float32).numpy()


def write_gguf(
    model: nn.Module,
    adapter: ModelAdapter,
    out: str | Path,
    tokenizer_gguf: str | Path,
    outtype: str = "f16",
    name: str | None = None,
    overwrite: bool = False,
    dense_layer: Mapping[str, Any] | None = None,
    read: Reader | None = None,
) -> GgufLayout:
    """Write `model` as one GGUF file llama.cpp runs; refuses (before writing) what it cannot hold
    (`dense_layer`: the dense model's layer shapes, for `check_quant_rows`).

    The header is written from the parameters' shapes, then the tensors one at a time: `read`
    gives a parameter's values by HF name (default: the model's own), so `model` may be a meta
    skeleton whose weights are read from disk tensor by tensor (`gguf_folder.py`); the file is the
    same byte for byte, and at most one tensor's conversion is alive besides what `read` holds."""
    if outtype not in OUTTYPES:
        raise ExportError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    layout = gguf_layout(model, adapter)
    check_quant_rows(model, adapter, outtype, dense_layer)
    if outtype in LLAMA_QUANTISED:  # written as f16, then quantised by llama.cpp's own quantiser
        with atomic_path(Path(out), overwrite) as tmp:
            write_quantised(
                Path(tmp),
                outtype,
                lambda f16: write_gguf(model, adapter, f16, tokenizer_gguf, "f16", name, True, read=read),
            )
        return layout
    tok = check_tokenizer(model, tokenizer_gguf)
    plan = tensor_plan(model, adapter, layout, outtype)
    if read is None:
        read = dict(model.named_parameters()).__getitem__
    with atomic_path(Path(out), overwrite) as tmp:
        w = gguf.GGUFWriter(str(tmp), layout.arch)
        try:
            _add_metadata(w, model, adapter, layout, outtype, name, tok)
            for t in plan:
                w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in plan:
                w.write_tensor_data(encoded(t, read, layout.head_dim))
        finally:
            w.close()
    return layout


def _add_metadata(
    w: gguf.GGUFWriter,
    model: nn.Module,
    adapter: ModelAdapter,
    layout: GgufLayout,
    outtype: str,
    name: str | None,
    tok: list[tuple[str, Any, Any, Any]],
) -> None:
    """The key-value metadata: architecture, per-layer (or global) counts, RoPE, the tokenizer."""
    cfg = adapter.config
    w.add_type(gguf.GGUFType.MODEL)
    if name:
        w.add_name(name)
    w.add_block_count(adapter.num_layers)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(adapter.hidden_size)
    w.add_feed_forward_length(layout.counts("n_ff"))
    w.add_head_count(layout.counts("n_head"))
    w.add_head_count_kv(layout.counts("n_head_kv"))
    w.add_key_length(layout.head_dim)
    w.add_value_length(layout.head_dim)
    w.add_rope_dimension_count(layout.head_dim)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(model.get_input_embeddings().weight.shape[0]))
    w.add_file_type(FILE_TYPES[outtype])
    for key, value, vtype, sub in tok:
        w.add_key_value(key, value, vtype, sub_type=sub)
