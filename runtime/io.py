"""Save and load pruned models: safetensors + per-layer shapes, no pickle, no remote code.

A pruned folder holds `model.safetensors`, `config.json`, `secateur.json` (every layer's
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
kept in `secateur_model_type` (and in secateur.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.groups import layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.runtime.outdir import OutputExistsError, atomic_dir  # noqa: F401  (public here too)
from secateur.runtime.surgery import apply_keep, drop_attention, drop_mlp

FORMAT_VERSION = 1
NOT_PLAIN_TYPE = (
    "secateur-pruned-{base} (per-layer shapes plain transformers cannot load exactly: "
    "use secateur.load_pruned(path); see the Secateur README)"
)


class PrunedFolderError(ValueError):
    """A pruned-model folder that is missing files or holds damaged ones."""


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


def pruned_config(model: nn.Module, adapter: ModelAdapter) -> tuple[dict[str, Any], bool, dict[str, Any]]:
    """config.json content, whether plain HF can load it, and the sparse per-layer overrides."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)  # a local (often virtualenv) path means nothing to the next reader
    cfg["architectures"] = [type(model).__name__]  # GGUF sources leave it null; engines pick classes by it
    shapes = all_layer_shapes(model, adapter)
    keys = adapter.hf_shape_keys()
    plain = (
        not added_biases(model)
        and _is_uniform(shapes)
        and (adapter.can_save_plain_hf() or shapes[0]["num_heads"] == adapter.num_heads)
    )
    if "head_dim" in cfg or adapter.kv_heads_key is not None:
        cfg["head_dim"] = adapter.head_dim
    if plain:
        for ours, theirs in keys.items():
            cfg[theirs] = shapes[0][ours]
        return cfg, True, {}
    cfg["secateur_model_type"] = cfg["model_type"]
    cfg["model_type"] = NOT_PLAIN_TYPE.format(base=cfg["model_type"])
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


def _state_dict_untied(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without aliases (tied lm_head), contiguous, on CPU."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        key = v.data_ptr()
        if key in seen and v.numel() > 0:
            continue
        seen.add(key)
        out[k] = v.detach().to("cpu").contiguous()
    return out


def write_model(model: nn.Module, adapter: ModelAdapter, folder: Path, tokenizer: Any = None) -> bool:
    """Write weights, configs and tokenizer into `folder` (no atomicity here)."""
    save_file(_state_dict_untied(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return write_metadata(model, adapter, folder, tokenizer)


def write_metadata(model: nn.Module, adapter: ModelAdapter, folder: Path, tokenizer: Any = None) -> bool:
    """Configs, per-layer shapes and tokenizer (the weights are written apart: whole or as shards)."""
    cfg, plain, per_layer = pruned_config(model, adapter)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
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
    adapter: ModelAdapter,
    out_dir: str | Path,
    tokenizer: Any = None,
    extra_files: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save atomically: a crash never leaves a half-written `out_dir`."""
    with atomic_dir(out_dir, overwrite) as tmp:
        write_model(model, adapter, tmp, tokenizer)
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


def build_skeleton(config: Any, shapes: list[dict[str, Any]], biases: list[str] = ()) -> nn.Module:
    """An empty (meta-weight) model with every layer cut to its recorded shape."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(config)
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
    for name in biases:
        mod = model.get_submodule(name)
        mod.bias = nn.Parameter(torch.empty(mod.out_features, device="meta"), requires_grad=False)
        mod.secateur_added_bias = True
    return model


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PrunedFolderError(f"{path.parent}: {path.name} is missing; not a complete Secateur output")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise PrunedFolderError(f"{path}: damaged JSON ({e})") from e
    if not isinstance(data, dict):
        raise PrunedFolderError(f"{path}: expected a JSON object")
    return data


def pruned_hf_config(folder: str | Path) -> Any:
    """The HF config of a Secateur output, with its real model type (config.json's may be a refusal)."""
    from transformers import AutoConfig

    folder = Path(folder)
    meta = _read_json(folder / "secateur.json")
    cfg = _read_json(folder / "config.json")
    base = cfg.pop("secateur_model_type", None) or meta.get("model_type") or cfg.get("model_type")
    cfg["model_type"] = base
    try:
        return AutoConfig.for_model(**cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise PrunedFolderError(f"{folder / 'config.json'}: not a usable {base!r} config ({e})") from e


def pruned_skeleton(folder: str | Path) -> nn.Module:
    """The weightless model of a Secateur output, every layer cut to its recorded shape (checked)."""
    folder = Path(folder)
    meta_file = folder / "secateur.json"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not meta_file.is_file():
        raise FileNotFoundError(f"{folder} is not a Secateur output (no secateur.json)")
    meta = _read_json(meta_file)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PrunedFolderError(
            f"{meta_file}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}"
        )
    config = pruned_hf_config(folder)
    layers = meta.get("layers")
    if not isinstance(layers, list) or len(layers) != getattr(config, "num_hidden_layers", -1):
        raise PrunedFolderError(f"{meta_file}: 'layers' does not list one shape per decoder layer")
    try:
        return build_skeleton(config, layers, meta.get("added_biases", []))
    except (KeyError, TypeError, ValueError) as e:
        raise PrunedFolderError(f"{meta_file}: layer shapes cannot be rebuilt ({e!r})") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Secateur output: model.safetensors, or the shards its index lists."""
    from secateur.runtime.weights import INDEX_NAME, SafetensorsSource, WeightSourceError

    weights = folder / "model.safetensors"
    if (folder / INDEX_NAME).is_file():
        try:
            src = SafetensorsSource(folder)
            return {k: src.get(k) for k in sorted(src.names())}
        except WeightSourceError as e:
            raise PrunedFolderError(str(e)) from e
    if not weights.is_file():
        raise PrunedFolderError(f"{folder}: model.safetensors is missing")
    try:
        return load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise PrunedFolderError(f"{weights}: damaged or not a safetensors file ({e})") from e


def load_pruned(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> nn.Module:
    """Rebuild a pruned model from its folder: safetensors only, no pickle, no remote code."""
    folder = Path(path)
    model = pruned_skeleton(folder)
    config = model.config
    state = _read_weights(folder)
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
    model.eval()
    return model
