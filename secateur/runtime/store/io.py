"""Save and load pruned models: safetensors + per-layer shapes, no pickle, no remote code.

A pruned folder holds the weights (`model.safetensors`, or shards with
`model.safetensors.index.json` as `save_pretrained` writes them, through huggingface_hub's
`save_torch_state_dict`), `config.json`, `generation_config.json`, `secateur.json` (every layer's
shapes) and the tokenizer. When every layer has the same shape and HF's modeling code can
express it, config.json's global fields are the pruned ones and plain
`AutoModelForCausalLM.from_pretrained` loads the folder. Otherwise secateur.json carries the
sparse `per_layer_config` overrides in the format HF's heterogeneous configs use (upstream PR
45333, NVIDIA's pruned Nemotron models), which `load_pruned` reads. It is kept out of
config.json for now: transformers 5.24 turns such a config heterogeneous and then refuses
global attribute reads in LlamaConfig's own validation, which breaks even AutoTokenizer.

A folder plain transformers cannot load *exactly* (per-layer widths, removed branches, added
biases, narrow value heads) must not load there at all: HF would re-initialise what it cannot
place and hand out a different model. Its config.json therefore carries a `model_type` that
transformers refuses, whose text tells the user to call `secateur.load_pruned`; the real type is
kept in `secateur_model_type` (and in secateur.json). A model `load_pruned` returns keeps that
refusal through the usual `model.save_pretrained(d)` (its config serialises the refused type), and
`load_pruned(d)` reads such a folder, which has no secateur.json, from the safetensors headers.
How each transformers entry point (Auto classes, concrete classes, `architectures`) is made to
refuse: `refusal.py`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.groups import layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.runtime.prune.surgery import apply_keep, drop_attention, drop_mlp
from secateur.runtime.store.fingerprint import saved_state_dict
from secateur.runtime.store.folder import (
    damaged,
    header_shapes,
    pruned_hf_config,
    read_json,
    weight_files,
)
from secateur.runtime.store.formats import DTYPES, PrunedFolderError
from secateur.runtime.store.outdir import OutputExistsError, atomic_dir  # noqa: F401  (public here too)
from secateur.runtime.store.refusal import (
    NOT_PLAIN_TYPE,
    branch_markers,
    refuse_plain_load,
    refused_architectures,
    without_markers,
)

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default


SHAPE_KEYS = ("num_heads", "num_kv_heads", "intermediate_size", "v_head_dim")


def all_layer_shapes(model: nn.Module, adapter: ModelAdapter) -> list[dict[str, Any]]:
    """Current shapes of every layer, as recorded in secateur.json."""
    return [layer_shapes(model, adapter, i) for i in range(adapter.num_layers)]


def _is_uniform(shapes: list[dict[str, Any]]) -> bool:
    first = shapes[0]
    return (
        all(s == first for s in shapes)
        and not first["skip_attention"]
        and not first["skip_mlp"]
        and (first["v_head_dim"] == first["head_dim"])
    )


def is_plain(model: nn.Module, adapter: ModelAdapter) -> bool:
    """Whether plain transformers can load this model exactly from a config with global sizes."""
    shapes = all_layer_shapes(model, adapter)
    return (
        not added_biases(model)
        and _is_uniform(shapes)
        and adapter.can_save_plain_hf(int(shapes[0]["num_heads"]))
    )


def pruned_config(model: nn.Module, adapter: ModelAdapter) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """config.json content, whether plain HF can load it, and the sparse per-layer overrides."""
    cfg = model.config.to_dict()
    cfg.pop("secateur_model_type", None)
    cfg["model_type"] = adapter.config.model_type  # the real type, even on a refusing config
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # a local (often virtualenv) path means nothing to the next reader
    cfg["architectures"] = [type(model).__name__]  # GGUF sources leave it null; engines pick classes by it
    shapes = all_layer_shapes(model, adapter)
    keys = adapter.hf_shape_keys()
    plain = is_plain(model, adapter)
    if "head_dim" in cfg or adapter.kv_heads_key is not None:
        cfg["head_dim"] = adapter.head_dim
    if plain:
        for ours, theirs in keys.items():
            cfg[theirs] = shapes[0][ours]
        return cfg, True, {}
    cfg["secateur_model_type"] = cfg["model_type"]
    cfg["model_type"] = NOT_PLAIN_TYPE.format(base=cfg["model_type"])
    cfg["architectures"] = refused_architectures(cfg["architectures"])
    per_layer: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(shapes):
        over: dict[str, Any] = {}
        for ours, theirs in keys.items():
            if not (s["skip_attention"] and ours in ("num_heads", "num_kv_heads")) and s[ours] != cfg.get(
                theirs
            ):
                over[theirs] = s[ours]
        if s["v_head_dim"] != s["head_dim"] and not s["skip_attention"]:
            over["v_head_dim"] = s["v_head_dim"]
        skip = [b for b, flag in (("attention", s["skip_attention"]), ("mlp", s["skip_mlp"])) if flag]
        if skip:
            over["skip"] = skip
        if over:
            per_layer[str(i)] = over
    return cfg, False, per_layer


def round_to_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Round a model's floating weights to `dtype` in place, keeping their working dtype, so what is
    evaluated afterwards is exactly what a `dtype` output holds (a no-op when nothing is narrower)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point() and t.dtype != dtype:
                t.copy_(t.to(dtype).to(t.dtype))


def write_weights(
    model: nn.Module,
    folder: Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Weights as `save_pretrained` writes them: one file, or shards plus an index past `max_shard_size`."""
    from huggingface_hub import save_torch_state_dict

    state = saved_state_dict(model, dtype)
    state.update(branch_markers(model, adapter_for(model.config), dtype=dtype))
    try:
        save_torch_state_dict(state, folder, max_shard_size=max_shard_size)
    except Exception as e:  # safetensors reports a full disk as its own error type
        raise write_error(folder, e) from e


def write_error(folder: Path, e: Exception) -> OSError:
    """A failed weight write (a full disk, no permission) as an OSError naming the folder."""
    return e if isinstance(e, OSError) else OSError(f"cannot write the weights into {folder}: {e}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def write_model(
    model: nn.Module,
    adapter: ModelAdapter,
    folder: Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> bool:
    """Write weights (in `dtype`, default the model's), configs and tokenizer into `folder` (no
    atomicity here)."""
    dtype = dtype or next(model.parameters()).dtype
    write_weights(model, folder, dtype, max_shard_size)
    return write_metadata(model, adapter, folder, tokenizer, dtype)


def write_metadata(
    model: nn.Module,
    adapter: ModelAdapter,
    folder: Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> bool:
    """Configs, generation config, per-layer shapes and tokenizer; the weights are written apart
    (whole by `write_weights`, or layer by layer by the streaming runtime's shard writer)."""
    cfg, plain, per_layer = pruned_config(model, adapter)
    cfg["dtype"] = _dtype_name(dtype or next(model.parameters()).dtype)
    cfg.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(folder))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_type": adapter.config.model_type,
        "plain_hf_loadable": plain,
        "per_layer_config": per_layer,
        "added_biases": added_biases(model),
        "layers": all_layer_shapes(model, adapter),
    }
    (folder / "secateur.json").write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return plain


def save_pruned(
    model: nn.Module,
    out_dir: str | Path | ModelAdapter,
    *args: Any,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned (or any supported) model as a Secateur output, atomically: a crash never leaves
    a half-written `out_dir`. The way to save a model after healing or fine-tuning it.

    `save_pruned(model, out_dir, tokenizer)`; the older `save_pruned(model, adapter, out_dir,
    tokenizer)` still works. `dtype` (torch dtype or name) defaults to the model's own.
    """
    if isinstance(out_dir, ModelAdapter):  # the older signature: (model, adapter, out_dir, ...)
        adapter, rest = out_dir, list(args)
        if not rest:
            raise TypeError("save_pruned(model, adapter, out_dir): out_dir is missing")
        out_dir = rest.pop(0)
    else:
        adapter, rest = adapter_for(model.config), list(args)
    if rest:
        if len(rest) > 1 or tokenizer is not None:
            raise TypeError("save_pruned: only out_dir and tokenizer may be given by position")
        tokenizer = rest[0]
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"save_pruned: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    with atomic_dir(out_dir, overwrite) as tmp:
        write_model(model, adapter, tmp, tokenizer, dtype, max_shard_size)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def added_biases(model: nn.Module) -> list[str]:
    """Linear layers that received a bias from pruning (FLAP's bias compensation)."""
    return sorted(n for n, m in model.named_modules() if getattr(m, "secateur_added_bias", False))


def _keep_for(shape: dict[str, Any], dense: dict[str, Any]) -> LayerKeep:
    """Keep-set that cuts a dense layer down to `shape` (first units of each kind)."""
    lk = LayerKeep(drop_attn=bool(shape["skip_attention"]), drop_mlp=bool(shape["skip_mlp"]))
    if not lk.drop_mlp and shape["intermediate_size"] != dense["intermediate_size"]:
        lk.mlp = list(range(int(shape["intermediate_size"])))
    if not lk.drop_attn:
        n_kv, n_q = int(shape["num_kv_heads"]), int(shape["num_heads"])
        r0 = int(dense["num_heads"]) // int(dense["num_kv_heads"])
        d, dv = int(dense["head_dim"]), int(shape["v_head_dim"])
        if dv != d:
            lk.v_channels = [g * d + c for g in range(int(dense["num_kv_heads"])) for c in range(dv)]
        if n_kv != dense["num_kv_heads"] or n_q != dense["num_heads"]:
            lk.kv_heads = list(range(n_kv))
            lk.q_heads = [g * r0 + j for g in range(n_kv) for j in range(n_q // n_kv)]
    return lk


def _empty_model(config: Any) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config)


def _cut(model: nn.Module, shapes: list[dict[str, Any]]) -> nn.Module:
    """Cut every layer of a dense (meta-weight) model to its recorded shape."""
    adapter = adapter_for(model.config)
    dense = layer_shapes(model, adapter, 0)
    keep = {i: _keep_for(s, dense) for i, s in enumerate(shapes)}
    apply_keep(
        model,
        adapter,
        {
            i: LayerKeep(mlp=k.mlp, kv_heads=k.kv_heads, q_heads=k.q_heads, v_channels=k.v_channels)
            for i, k in keep.items()
        },
    )
    for i, k in keep.items():
        if k.drop_attn:
            drop_attention(model, adapter, i)
        if k.drop_mlp:
            drop_mlp(model, adapter, i)
    return model


def _add_biases(model: nn.Module, biases: list[str]) -> None:
    for name in biases:
        mod = model.get_submodule(name)
        mod.bias = nn.Parameter(torch.empty(mod.out_features, device="meta"), requires_grad=False)
        mod.secateur_added_bias = True


def build_skeleton(config: Any, shapes: list[dict[str, Any]], biases: list[str] = ()) -> nn.Module:
    """An empty (meta-weight) model with every layer cut to its recorded shape."""
    model = _cut(_empty_model(config), shapes)
    _add_biases(model, list(biases))
    return model


def _rows(tensors: dict[str, list[int]], name: str, where: str) -> int:
    shape = tensors.get(name)
    if shape is None or len(shape) != 2:
        raise PrunedFolderError(f"{where}: tensor {name} is missing or not a matrix")
    return int(shape[0])


def shapes_from_headers(folder: str | Path, config: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-layer shapes and added biases read from the weights' headers (a folder without
    secateur.json, e.g. written by `save_pretrained`)."""
    adapter = adapter_for(config)
    tensors = header_shapes(folder)
    where = str(folder)
    d = adapter.head_dim
    shapes: list[dict[str, Any]] = []
    for i in range(adapter.num_layers):
        p = adapter.layer_prefix(i)
        s: dict[str, Any] = {"head_dim": d, "v_head_dim": d, "num_heads": 0, "num_kv_heads": 0}
        s["skip_attention"] = f"{p}.{adapter.q}.weight" not in tensors
        if not s["skip_attention"]:
            rows = {n: _rows(tensors, f"{p}.{getattr(adapter, n)}.weight", where) for n in ("q", "k", "v")}
            if rows["q"] % d or rows["k"] % d or not rows["k"] or rows["v"] % (rows["k"] // d):
                raise PrunedFolderError(f"{where}: layer {i}'s q/k/v rows {rows} do not fit head_dim {d}")
            s.update(
                num_heads=rows["q"] // d,
                num_kv_heads=rows["k"] // d,
                v_head_dim=rows["v"] // (rows["k"] // d),
            )
        down = tensors.get(f"{p}.{adapter.mlp_out}.weight")
        if down is None and adapter.mlp_module is None:
            raise PrunedFolderError(f"{where}: tensor {p}.{adapter.mlp_out}.weight is missing")
        s["intermediate_size"] = int(down[1]) if down is not None and len(down) == 2 else 0
        s["skip_mlp"] = s["intermediate_size"] == 0
        shapes.append(s)
    model = _cut(_empty_model(config), shapes)
    expected = set(model.state_dict())
    biases = sorted(
        k[: -len(".bias")]
        for k in tensors
        if k not in expected and k.endswith(".bias") and f"{k[: -len('.bias')]}.weight" in expected
    )
    return shapes, biases


def pruned_skeleton(folder: str | Path) -> nn.Module:
    """The weightless model of a pruned folder, every layer cut to its recorded shape (checked):
    from secateur.json, or from the safetensors headers when there is none."""
    folder = Path(folder)
    meta_file = folder / "secateur.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    config = pruned_hf_config(folder)
    if not meta_file.is_file():
        shapes, biases = shapes_from_headers(folder, config)
        try:
            return build_skeleton(config, shapes, biases)
        except (KeyError, TypeError, ValueError) as e:
            raise PrunedFolderError(f"{folder}: the weights' shapes cannot be rebuilt ({e!r})") from e
    meta = read_json(meta_file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrunedFolderError(
            f"{meta_file}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    layers = meta.get("layers")
    if not isinstance(layers, list) or len(layers) != getattr(config, "num_hidden_layers", -1):
        raise PrunedFolderError(f"{meta_file}: 'layers' does not list one shape per decoder layer")
    try:
        return build_skeleton(config, layers, meta.get("added_biases", []))
    except (KeyError, TypeError, ValueError) as e:
        raise PrunedFolderError(f"{meta_file}: layer shapes cannot be rebuilt ({e!r})") from e


def load_pruned(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a pruned model from its folder: safetensors only, no pickle, no remote code.

    Reads Secateur outputs and folders a loaded model was saved to with `save_pretrained`
    (sharded or not). `dtype` None keeps the saved dtype."""
    from transformers import GenerationConfig

    folder = Path(path)
    model = pruned_skeleton(folder)
    config = model.config
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise damaged(f, e) from e
    state = without_markers(state, set(model.state_dict()))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise PrunedFolderError(f"{folder}: weights do not match recorded shapes ({e})") from e
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise PrunedFolderError(
            f"{folder}: weights do not match recorded shapes (missing {missing}, unexpected {unexpected})"
        )
    if tied:
        model.tie_weights()
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    config.dtype = next(model.parameters()).dtype
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    if not is_plain(model, adapter_for(config)):
        refuse_plain_load(model)
    model.eval()
    return model
