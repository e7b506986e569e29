"""Tiny random models of every supported family, built from configs (for tests and examples)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from secateur.runtime.speed.probe import byte_symbols, llama_header, shape_of_config

# ten words in a fixed order: calibration text any tiny model's tokenizer reads, the same every run
CALIBRATION_WORDS = ("the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly")

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "opt")
# real checkpoints' shapes that the GQA families above do not cover: Gemma 3 270M has one KV
# head shared by all query heads (kv_group pruning has nothing to remove there)
TINY_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma3_1kv": ("gemma3_text", {"num_key_value_heads": 1})
}


def tiny_config(family: str, **over: Any) -> Any:
    """A small config of `family` with GQA (2 KV groups x 2 query heads) where the family has it."""
    from transformers import AutoConfig

    if family in TINY_VARIANTS:
        base, extra = TINY_VARIANTS[family]
        return tiny_config(base, **{**extra, **over})
    common: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
    )
    if family == "opt":
        cfg = dict(common, ffn_dim=96, word_embed_proj_dim=64, enable_bias=True, do_layer_norm_before=True)
    else:
        cfg = dict(
            common,
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-6,
            tie_word_embeddings=family in ("gemma3_text", "gemma2", "qwen3"),
        )
        if family == "qwen2":
            cfg["attention_bias"] = True
        if family in ("gemma3_text", "gemma2"):
            cfg.update(
                sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                query_pre_attn_scalar=16,
            )
    cfg.update(over)
    return AutoConfig.for_model(family, **cfg)


def tiny_model(family: str, seed: int = 0, **over: Any) -> nn.Module:
    """A randomly initialised tiny model in eval mode with eager attention (deterministic)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg)
    # random-init norms/biases away from their identity values so couplings are really exercised
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer(vocab_size: int = 128):
    """A character-level fast tokenizer over ASCII (id = code point, anything else <unk>), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # id 0 is "<unk>" alone (it also pads): sharing it with a character left the word-level model
    # without an unknown token, so any non-ASCII text (WikiText has plenty) failed to encode
    vocab = {chr(i): i for i in range(1, min(vocab_size, 128))}
    vocab["<unk>"] = 0
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="\x03", pad_token="<unk>"
    )


def save_tiny(folder: str, family: str = "llama", seed: int = 0, **over: Any) -> str:
    """Write a tiny model + tokenizer as a local Hugging Face folder that `load_model` accepts."""
    model = tiny_model(family, seed, **over)
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def _llama_cpp_permute(w: Any, n_head: int) -> Any:
    """The q/k row order llama.cpp's converter writes (transformers undoes it when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_tiny_gguf(path: str, seed: int = 0) -> nn.Module:
    """Write a tiny LLaMA as a GGUF file (Q8_0 matrices, byte-level tokenizer) and return the model.

    The file is what llama.cpp's converter would make of the model, so loading it exercises the
    same dequantisation and q/k un-permutation as a real GGUF."""
    import gguf

    model = tiny_model("llama", seed, vocab_size=256)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    llama_header(
        w, shape_of_config(c).with_(n_layers=c.num_hidden_layers), c.max_position_embeddings, c.rms_norm_eps
    )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_symbols())
    w.add_token_types([1] * 256)
    w.add_token_scores([0.0] * 256)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for key, t in model.state_dict().items():
        base, suffix = key.rsplit(".", 1)
        name = names.get_name(base)
        if name is None:
            continue
        a = t.float().numpy()
        if ".attn_q" in name:
            a = _llama_cpp_permute(a, c.num_attention_heads)
        elif ".attn_k" in name:
            a = _llama_cpp_permute(a, c.num_key_value_heads)
        if a.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(f"{name}.{suffix}", gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(f"{name}.{suffix}", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def calibration_text(n_words: int = 6000) -> str:
    """Deterministic calibration text: the ten CALIBRATION_WORDS in a fixed stride-7 order."""
    return " ".join(CALIBRATION_WORDS[(i * 7) % 10] for i in range(n_words))


def tiny_recipe_doc(model_id: str, **over: Any) -> dict[str, Any]:
    """A small fasp recipe (MLP channels, 20% of the parameters, float32 on CPU, calibration from
    `c.txt`, no evaluation), so that a test states only what it changes: `over` is merged one
    level deep into the sections, and None drops a section or a key."""
    doc: dict[str, Any] = {
        "version": 1,
        "model": {"id": model_id, "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "c.txt", "n_samples": 4, "seqlen": 32, "heldout_windows": 2},
        "targets": {"mlp": True, "attention": "none"},
        "budget": {"params": 0.2, "multiple_of": 4},
        "evaluate": {"enabled": False},
    }
    return _merged(doc, over)


def _merged(doc: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`doc` with `over` merged one level deep into its sections; None drops a section or a key."""
    for k, v in over.items():
        if v is None:
            doc.pop(k, None)
        elif isinstance(v, dict) and isinstance(doc.get(k), dict):
            doc[k] = {kk: vv for kk, vv in {**doc[k], **v}.items() if vv is not None}
        else:
            doc[k] = v
    return doc


def write_tiny_recipe(path: Path, model_id: str, **over: Any) -> Path:
    """Write `tiny_recipe_doc(model_id, **over)` to `path` (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tiny_recipe_doc(model_id, **over), allow_unicode=True))
    return path


def tiny_recipe(folder: Path, model: str = "m", name: str = "r.yaml", **over: Any) -> Path:
    """`folder/name`: the small recipe of `tiny_recipe_doc` on the model `folder/model`; a tiny LLaMA
    `folder/m` and the calibration text `folder/c.txt` are written first where missing."""
    if not (folder / "m").exists():
        save_tiny(str(folder / "m"), "llama")
    if not (folder / "c.txt").exists():
        (folder / "c.txt").write_text(calibration_text())
    return write_tiny_recipe(folder / name, str(folder / model), **over)


# the calibration text of the search recipes: few distinct tokens, so layers differ in what they need
SEARCH_TEXT = "a searched allocation beats a uniform one when layers differ. " * 600


def tiny_search_recipe(folder: Path, file: str = "r.yaml", model: str = "m", **over: Any) -> Path:
    """`folder/file`: a small allocation-search recipe (MLP channels and query heads, 30% of the
    parameters, 5 trials of 256 held-out tokens, no pruner) on the model `folder/model`, so that a
    test states only what it changes (`over`, merged as in `tiny_recipe_doc`); a 4-layer tiny LLaMA
    `folder/m` and the calibration text `folder/c.txt` are written first where missing."""
    if not (folder / "m").exists():
        save_tiny(str(folder / "m"), "llama", num_hidden_layers=4)
    if not (folder / "c.txt").exists():
        (folder / "c.txt").write_text(SEARCH_TEXT)
    doc: dict[str, Any] = {
        "version": 1,
        "name": "tiny-search",
        "model": {"id": str(folder / model), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "c.txt", "n_samples": 8, "seqlen": 32},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"params": 0.3, "multiple_of": 4, "min_keep": 0.2},
        "allocation": {"method": "search", "search": {"trials": 5, "heldout_tokens": 256, "pruner": False}},
        "evaluate": {"enabled": False},
        "output": {"dir": str(folder / "run")},
    }
    path = folder / file
    path.write_text(yaml.safe_dump(_merged(doc, over)))
    return path
