"""Probe models: random-weight Llama models of given layer shapes, built for timing only.

Latency does not depend on weight values, so the width sweep and the latency model time small
synthetic models (a few decoder layers of the real model's shapes) instead of the real one: a
GGUF file for llama.cpp, a transformers model for PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateur.runtime.speed.quant import LLAMA_QUANTISED, encode_matrix, write_quantised
from secateur.runtime.store.atomic import replacing


@dataclass(frozen=True)
class ProbeShape:
    """One decoder layer's shapes (repeated `n_layers` times) and the vocabulary of the head."""

    hidden: int
    n_head: int
    n_kv: int
    head_dim: int
    n_ff: int
    vocab: int
    n_layers: int = 1

    def with_(self, **kw: Any) -> ProbeShape:
        return replace(self, **kw)

    def key(self) -> dict[str, int]:
        return asdict(self)


def shape_of_config(config: Any) -> ProbeShape:
    """The dense model's probe shape from a Hugging Face config of the Llama family layout."""
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    return ProbeShape(
        hidden=int(config.hidden_size),
        n_head=n_head,
        n_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        head_dim=head_dim,
        n_ff=int(getattr(config, "intermediate_size", None) or config.ffn_dim),
        vocab=int(config.vocab_size),
    )


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 symbols of a byte-level BPE vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _token_list(vocab: int) -> list[str]:
    """Distinct token strings: llama.cpp needs a vocabulary as long as the head, not a real one."""
    base = byte_symbols()
    return (base + [f"<p{i}>" for i in range(max(0, vocab - len(base)))])[:vocab]


def llama_header(w: Any, shape: ProbeShape, context: int, eps: float) -> None:
    """The `llama` architecture's hyper-parameters of a uniform model of `shape` (plain RoPE)."""
    w.add_block_count(shape.n_layers)
    w.add_context_length(context)
    w.add_embedding_length(shape.hidden)
    w.add_feed_forward_length(shape.n_ff)
    w.add_head_count(shape.n_head)
    w.add_head_count_kv(shape.n_kv)
    w.add_key_length(shape.head_dim)
    w.add_value_length(shape.head_dim)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(eps)
    w.add_vocab_size(shape.vocab)


def write_probe_gguf(shape: ProbeShape, path: str | Path, outtype: str = "f16", seed: int = 0) -> Path:
    """A uniform `llama` GGUF of random weights with `shape` (q/k order is irrelevant for timing)."""
    import gguf

    path = Path(path)
    if outtype in LLAMA_QUANTISED:
        write_quantised(path, outtype, lambda f16: write_probe_gguf(shape, f16, "f16", seed))
        return path
    rng = np.random.default_rng(seed)
    with replacing(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        llama_header(w, shape, context=4096, eps=1e-5)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        tokens = _token_list(shape.vocab)
        w.add_token_list(tokens)
        w.add_token_types([1] * len(tokens))
        w.add_token_merges([f"{tokens[66]} {tokens[67]}"])  # llama.cpp's BPE loader wants one merge at least
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

        def mat(name: str, rows: int, cols: int) -> None:
            data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)
            enc, qtype = encode_matrix(data, outtype)
            w.add_tensor(name, enc, raw_dtype=qtype)

        h, qd, kd = shape.hidden, shape.n_head * shape.head_dim, shape.n_kv * shape.head_dim
        mat("token_embd.weight", shape.vocab, h)
        w.add_tensor("output_norm.weight", np.ones(h, np.float32))
        mat("output.weight", shape.vocab, h)
        for i in range(shape.n_layers):
            w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
            w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
            mat(f"blk.{i}.attn_q.weight", qd, h)
            mat(f"blk.{i}.attn_k.weight", kd, h)
            mat(f"blk.{i}.attn_v.weight", kd, h)
            mat(f"blk.{i}.attn_output.weight", h, qd)
            mat(f"blk.{i}.ffn_gate.weight", shape.n_ff, h)
            mat(f"blk.{i}.ffn_up.weight", shape.n_ff, h)
            mat(f"blk.{i}.ffn_down.weight", h, shape.n_ff)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def probe_torch_model(shape: ProbeShape, dtype: Any, device: str = "cpu", seed: int = 0) -> Any:
    """A transformers Llama of `shape` (random weights, eval mode, SDPA attention) for timing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.n_ff,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv,
        head_dim=shape.head_dim,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()
