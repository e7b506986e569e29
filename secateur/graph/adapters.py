"""Model-family adapters: where the parts of a decoder layer live, and nothing else.

Every pruning algorithm in Secateur is written once against this interface. An adapter
holds module names and the config keys that describe shapes; it holds no pruning logic.
Adding a family means adding one small registered subclass (see docs/ADD_A_MODEL.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, type[ModelAdapter]] = {}


class UnsupportedModelError(ValueError):
    """Raised when no adapter is registered for a model type."""


def register(*model_types: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator registering an adapter for one or more Hugging Face `model_type`s."""

    def wrap(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        for mt in model_types:
            _REGISTRY[mt] = cls
        cls.model_types = tuple(model_types)
        return cls

    return wrap


def supported_model_types() -> list[str]:
    """Model types with a registered adapter, sorted."""
    return sorted(_REGISTRY)


def adapter_for(config: Any) -> ModelAdapter:
    """Return the adapter for a transformers config, or fail naming the supported types."""
    model_type = getattr(config, "model_type", None)
    cls = _REGISTRY.get(model_type)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported types: {', '.join(supported_model_types())}"
        )
    return cls(config)


class ModelAdapter:
    """Names and shapes of one decoder family (LLaMA layout by default)."""

    model_types: tuple[str, ...] = ()

    layers_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    final_norm_path: str = "model.norm"
    lm_head_path: str = "lm_head"
    attn: str = "self_attn"
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    mlp_module: str | None = "mlp"
    mlp_in: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_out: str = "mlp.down_proj"
    # norms whose output only feeds one branch: removed together with that branch
    attn_branch_norms: tuple[str, ...] = ("input_layernorm",)
    mlp_branch_norms: tuple[str, ...] = ("post_attention_layernorm",)
    # the down projection's output is added to the residual stream as it is (no norm after it)
    mlp_adds_to_residual: bool = True
    # norms over head_dim shared by all heads (qwen3, gemma3): touched by attention units, never sliced
    head_norms: tuple[str, ...] = ()
    # config keys
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    intermediate_key: str = "intermediate_size"
    # attention-module attributes that must follow head counts
    gqa_attr: str | None = "num_key_value_groups"
    heads_attr: str | None = None
    # rotary position embeddings on q/k (Secateur's own attention module supports these families)
    rope: bool = True
    # why value-channel pruning (Secateur's own attention module) cannot hold this family, if it cannot
    v_channel_refusal: str | None = None
    # inference-engine names per model_type: llama.cpp (GGUF) architecture for a uniform model and
    # for one with per-layer shapes (None: llama.cpp has none), and whether vLLM's DeciLM
    # (Nemotron-NAS, a Llama layout with per-layer blocks) can hold it
    gguf_archs: dict[str, tuple[str, str | None]] = {}
    decilm_types: tuple[str, ...] = ()

    def __init__(self, config: Any) -> None:
        self.config = config

    # ---- shapes -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.config, self.heads_key))

    @property
    def num_kv_heads(self) -> int:
        if self.kv_heads_key is None:
            return self.num_heads
        value = getattr(self.config, self.kv_heads_key, None)
        return int(value) if value is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.config, "head_dim", None)
        return int(hd) if hd else self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return int(getattr(self.config, self.intermediate_key))

    # ---- module access ----------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def set_head_counts(self, attn: nn.Module, n_heads: int, n_kv: int) -> None:
        """Update the attention module's attributes after heads were sliced."""
        if self.gqa_attr is not None:
            setattr(attn, self.gqa_attr, max(n_heads // max(n_kv, 1), 1))
        if self.heads_attr is not None:
            setattr(attn, self.heads_attr, n_heads)

    def hf_shape_keys(self) -> dict[str, str]:
        """Config keys of per-layer shapes, as the HF config names them."""
        keys = {"num_heads": self.heads_key, "intermediate_size": self.intermediate_key}
        if self.kv_heads_key:
            keys["num_kv_heads"] = self.kv_heads_key
        return keys

    def can_save_plain_hf(self, num_heads: int) -> bool:
        """Whether HF's own config and modeling code accept `num_heads` query heads in every layer."""
        return True

    def gguf_arch(self, heterogeneous: bool) -> str | None:
        """llama.cpp's architecture for this family (per-layer shapes need one that reads arrays)."""
        uniform, per_layer = self.gguf_archs.get(self.config.model_type, (None, None))
        return per_layer if heterogeneous else uniform

    def exports_decilm(self) -> bool:
        """Whether vLLM's DeciLM model has this family's layout (Llama: RMSNorm, SwiGLU, RoPE)."""
        return self.config.model_type in self.decilm_types


@register("llama", "mistral", "qwen2")
class LlamaAdapter(ModelAdapter):
    """LLaMA, Mistral and Qwen2 share the same layout (Qwen2 adds q/k/v biases)."""

    gguf_archs = {"llama": ("llama", "deci"), "mistral": ("llama", "deci"), "qwen2": ("qwen2", None)}
    decilm_types = ("llama", "mistral")


@register("qwen3")
class Qwen3Adapter(ModelAdapter):
    """Qwen3: LLaMA layout plus per-head q_norm/k_norm over head_dim."""

    gguf_archs = {"qwen3": ("qwen3", None)}

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.head_norms = ("self_attn.q_norm", "self_attn.k_norm")


@register("gemma3_text", "gemma2")
class Gemma3Adapter(ModelAdapter):
    """Gemma 2/3: sandwich norms around both branches, q/k norms over head_dim."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.attn_branch_norms = ("input_layernorm", "post_attention_layernorm")
        self.mlp_branch_norms = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        self.mlp_adds_to_residual = False  # post_feedforward_layernorm comes after down_proj
        if getattr(config, "model_type", "") == "gemma3_text":
            self.head_norms = ("self_attn.q_norm", "self_attn.k_norm")
        if getattr(config, "attn_logit_softcapping", None):
            self.v_channel_refusal = (
                "Secateur's attention module has no attention logit soft-capping (Gemma 2)"
            )

    def can_save_plain_hf(self, num_heads: int) -> bool:
        # Gemma3TextConfig refuses hidden_size % num_attention_heads != 0 although head_dim is its
        # own key (Gemma 3 270M: 640 wide, 4 heads; 3 heads cannot be written as a plain config)
        return self.hidden_size % max(num_heads, 1) == 0


@register("opt")
class OptAdapter(ModelAdapter):
    """OPT: biases everywhere, fc1/fc2 directly on the layer, MHA (no GQA)."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.layers_path = "model.decoder.layers"
        self.embed_path = "model.decoder.embed_tokens"
        self.final_norm_path = "model.decoder.final_layer_norm"
        self.o = "self_attn.out_proj"
        self.mlp_module = None
        self.mlp_in = ("fc1",)
        self.mlp_out = "fc2"
        self.attn_branch_norms = ("self_attn_layer_norm",) if config.do_layer_norm_before else ()
        self.mlp_branch_norms = ()
        self.mlp_adds_to_residual = bool(config.do_layer_norm_before)  # post-norm OPT normalises the sum
        self.kv_heads_key = None
        self.intermediate_key = "ffn_dim"
        self.gqa_attr = None
        self.heads_attr = "num_heads"
        self.rope = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def can_save_plain_hf(self, num_heads: int) -> bool:
        # OPTAttention derives head_dim from hidden_size // num_heads, so fewer heads cannot be expressed.
        return num_heads == self.num_heads
