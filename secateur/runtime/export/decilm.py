"""DeciLM (Nemotron-NAS) checkpoints for vLLM, and a reader that rebuilds the model from one.

vLLM's `DeciLMForCausalLM` (vllm/model_executor/models/nemotron_nas.py) builds each layer from
`config.block_configs[i]`: `attention.no_op` removes the attention branch, otherwise the layer has
`num_attention_heads` query heads (one global count) and `num_attention_heads //
attention.n_heads_in_group` KV heads; `ffn.no_op` removes the MLP, otherwise `ffn.intermediate_size`
channels. Weights keep the Llama names. Per-layer query-head counts are therefore padded: every
KV group gets the same number of query heads, the extra ones with zero query rows and zero o_proj
columns, which adds exactly nothing to the output. Biases are global switches there
(`attention_bias` for o_proj, `qkv_bias`, `mlp_bias`), so a bias FLAP added in some layers is written
as zeros in the others. `block_configs` entries are objects in vLLM, so the folder ships a small
`configuration_decilm.py` (AutoConfig via `auto_map`: vLLM needs `--trust-remote-code`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.graph.keep import LayerKeep
from secateur.runtime.export import ExportError, atomic_path, one_head_size_shapes
from secateur.runtime.prune.surgery import apply_keep, drop_attention, drop_mlp

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
MODEL_TYPE = "nemotron-nas"
CONFIG_CODE = '''"""DeciLM / Nemotron-NAS config written by Secateur: per-layer blocks as attribute objects."""

from types import SimpleNamespace

from transformers import LlamaConfig


def _ns(d):
    return SimpleNamespace(**{k: _ns(v) if isinstance(v, dict) else v for k, v in d.items()})


def _plain(o):
    return {k: _plain(v) if isinstance(v, SimpleNamespace) else v for k, v in vars(o).items()}


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [_ns(b) if isinstance(b, dict) else b for b in (block_configs or [])]
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [_plain(b) if isinstance(b, SimpleNamespace) else b for b in self.block_configs]
        return out
'''


def _query_heads(shapes: list[dict[str, Any]], dense_heads: int) -> int:
    """The one query-head count every attention layer gets: the smallest multiple of every layer's
    KV-head count that holds its real query heads (the dense count when no layer needs more)."""
    kept = [s for s in shapes if not s["skip_attention"]]
    if not kept:
        return dense_heads
    step = math.lcm(*(int(s["num_kv_heads"]) for s in kept))
    need = max(int(s["num_heads"]) for s in kept)
    return step * math.ceil(need / step)


def _pad_heads(
    w: torch.Tensor, n_kv: int, real: int, per_group: int, head_dim: int, axis: int
) -> torch.Tensor:
    """Spread `real` query heads per KV group into `per_group` slots, zeros in the extra ones."""
    if real == per_group:
        return w
    w = w.movedim(axis, 0)
    rest = w.shape[1:]
    grouped = w.reshape(n_kv, real, head_dim, *rest)
    pad = torch.zeros(n_kv, per_group - real, head_dim, *rest, dtype=w.dtype)
    return torch.cat([grouped, pad], dim=1).reshape(n_kv * per_group * head_dim, *rest).movedim(0, axis)


def decilm_config(model: nn.Module, adapter: ModelAdapter) -> tuple[dict[str, Any], int]:
    """config.json for vLLM's DeciLM and the global query-head count; refuses what it cannot hold."""
    if not adapter.exports_decilm():
        raise ExportError(
            f"model_type {adapter.config.model_type!r}: vLLM's DeciLM model has the Llama layout only "
            f"(llama, mistral); export this family to GGUF or save it as a plain folder"
        )
    shapes = one_head_size_shapes(model, adapter, "vLLM")
    heads = _query_heads(shapes, adapter.num_heads)
    biases = {n.rsplit(".", 2)[-2] for n, _ in model.named_parameters() if n.endswith(".bias")}
    cfg = model.config.to_dict()
    for key in (
        "quantization_config",
        "_name_or_path",
        "secateur_model_type",
        "auto_map",
        "per_layer_config",
    ):
        cfg.pop(key, None)
    attn_bias = bool(biases & {"o_proj", "q_proj", "k_proj", "v_proj"})
    kv = [int(s["num_kv_heads"]) for s in shapes if not s["skip_attention"]]
    cfg.update(
        architectures=["DeciLMForCausalLM"],
        model_type=MODEL_TYPE,
        auto_map={"AutoConfig": "configuration_decilm.DeciLMConfig"},
        num_attention_heads=heads,
        num_key_value_heads=max(kv) if kv else heads,
        head_dim=adapter.head_dim,
        intermediate_size=max(int(s["intermediate_size"]) for s in shapes) or adapter.intermediate_size,
        attention_bias=attn_bias,
        qkv_bias=bool(biases & {"q_proj", "k_proj", "v_proj"}),
        mlp_bias=bool(biases & {"gate_proj", "up_proj", "down_proj"}),
        block_configs=[
            {
                "attention": {
                    "no_op": bool(s["skip_attention"]),
                    "replace_with_linear": False,
                    "n_heads_in_group": None if s["skip_attention"] else heads // int(s["num_kv_heads"]),
                },
                "ffn": {
                    "no_op": bool(s["skip_mlp"]),
                    "replace_with_linear": False,
                    "intermediate_size": None if s["skip_mlp"] else int(s["intermediate_size"]),
                },
            }
            for s in shapes
        ],
    )
    return cfg, heads


def _decilm_state(model: nn.Module, adapter: ModelAdapter, cfg: dict[str, Any], dtype: torch.dtype) -> dict:
    """Llama-named tensors with padded query heads and the zero biases the global switches need."""
    heads, d = cfg["num_attention_heads"], adapter.head_dim
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # tied lm_head is listed once, as vLLM expects
        out[name] = p.detach().to("cpu", torch.float32)
    hidden = adapter.hidden_size
    for i, block in enumerate(cfg["block_configs"]):
        p = adapter.layer_prefix(i)
        if not block["attention"]["no_op"]:
            n_kv = heads // block["attention"]["n_heads_in_group"]
            real = model.get_submodule(f"{p}.{adapter.q}").out_features // d // n_kv
            per = heads // n_kv
            q, o = f"{p}.{adapter.q}", f"{p}.{adapter.o}"
            out[f"{q}.weight"] = _pad_heads(out[f"{q}.weight"], n_kv, real, per, d, 0)
            out[f"{o}.weight"] = _pad_heads(out[f"{o}.weight"], n_kv, real, per, d, 1)
            if f"{q}.bias" in out:
                out[f"{q}.bias"] = _pad_heads(out[f"{q}.bias"], n_kv, real, per, d, 0)
            sizes = {adapter.q: heads * d, adapter.k: n_kv * d, adapter.v: n_kv * d, adapter.o: hidden}
            wanted = [adapter.o] if cfg["attention_bias"] else []
            wanted += [adapter.q, adapter.k, adapter.v] if cfg["qkv_bias"] else []
            for m in wanted:
                out.setdefault(f"{p}.{m}.bias", torch.zeros(sizes[m]))
        if not block["ffn"]["no_op"] and cfg["mlp_bias"]:
            n = block["ffn"]["intermediate_size"]
            for m in adapter.mlp_in:
                out.setdefault(f"{p}.{m}.bias", torch.zeros(n))
            out.setdefault(f"{p}.{adapter.mlp_out}.bias", torch.zeros(hidden))
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def write_decilm(
    model: nn.Module,
    adapter: ModelAdapter,
    out: str | Path,
    tokenizer: Any = None,
    dtype: str = "bf16",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a DeciLM checkpoint folder (config.json, model.safetensors, config code, tokenizer)."""
    if dtype not in DTYPES:
        raise ExportError(f"decilm weights are {', '.join(DTYPES)}; got {dtype!r}")
    cfg, _ = decilm_config(model, adapter)
    cfg["torch_dtype"] = cfg["dtype"] = str(DTYPES[dtype]).removeprefix("torch.")
    state = _decilm_state(model, adapter, cfg, DTYPES[dtype])
    with atomic_path(Path(out), overwrite) as tmp:
        tmp.mkdir()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
        (tmp / "configuration_decilm.py").write_text(CONFIG_CODE)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return cfg


def read_decilm(folder: str | Path) -> nn.Module:
    """Rebuild a model from a DeciLM checkpoint with vLLM's reading of block_configs (no remote code):
    a Llama with the global query-head count, each layer's KV heads repeated to one per query head
    (what grouped attention computes), MLPs cut to their widths, no-op branches removed."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get("model_type") != MODEL_TYPE:
        raise ExportError(f"{folder / 'config.json'}: model_type is not {MODEL_TYPE!r}")
    blocks = cfg.pop("block_configs")
    heads = int(cfg["num_attention_heads"])
    keys = ("model_type", "auto_map", "architectures", "qkv_bias", "attention_bias", "mlp_bias", "dtype")
    base = {k: v for k, v in cfg.items() if k not in keys}
    base.update(num_key_value_heads=heads, attention_bias=False, mlp_bias=False)
    config = AutoConfig.for_model("llama", **base)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(config)
    keep = {}
    for i, b in enumerate(blocks):
        n = b["ffn"]["intermediate_size"]
        keep[i] = LayerKeep(mlp=list(range(n)) if n and n != adapter.intermediate_size else None)
    apply_keep(model, adapter, keep)
    for i, b in enumerate(blocks):
        if b["attention"]["no_op"]:
            drop_attention(model, adapter, i)
        if b["ffn"]["no_op"]:
            drop_mlp(model, adapter, i)
    state = load_file(str(folder / "model.safetensors"))
    d = adapter.head_dim
    for i, b in enumerate(blocks):
        if b["attention"]["no_op"]:
            continue
        group = int(b["attention"]["n_heads_in_group"])
        for m in (adapter.k, adapter.v):
            for suffix in ("weight", "bias"):
                key = f"{adapter.layer_prefix(i)}.{m}.{suffix}"
                if key in state:
                    t = state[key]
                    state[key] = (
                        t.reshape(-1, d, *t.shape[1:])
                        .repeat_interleave(group, 0)
                        .reshape(heads * d, *t.shape[1:])
                    )
    for key, t in state.items():
        if key.endswith(".bias"):
            mod = model.get_submodule(key.rsplit(".", 1)[0])
            if getattr(mod, "bias", None) is None:
                mod.bias = nn.Parameter(torch.empty(t.shape, device="meta"), requires_grad=False)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ExportError(
            f"{folder}: weights do not match block_configs (missing {missing}, unexpected {unexpected})"
        )
    if tied:
        model.tie_weights()
    return model.float().eval()
