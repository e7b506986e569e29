"""Pruned models save without pickle and load back with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateur.graph.adapters import adapter_for
from secateur.graph.keep import LayerKeep
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import OutputExistsError, atomic_dir, load_pruned, save_pruned
from secateur.testing import TINY_FAMILIES, tiny_model

from .conftest import input_ids

HETERO = {
    0: LayerKeep(mlp=list(range(0, 96, 3)), q_heads=[1, 3], v_channels=[c for c in range(32) if c % 2]),
    1: LayerKeep(drop_attn=True),
    2: LayerKeep(drop_mlp=True, kv_heads=[0]),
}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids()).logits


def _hetero(family: str):
    """A tiny model of `family` cut to HETERO (OPT, without GQA, drops whole heads in layer 0;
    Gemma 2, whose logit soft-capping Secateur's value-channel attention lacks, keeps value heads whole)."""
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    keep = dict(HETERO)
    if family == "opt":
        keep[0] = LayerKeep(mlp=list(range(0, 96, 3)), kv_heads=[1, 3])
    if family == "gemma2":
        keep[0] = LayerKeep(mlp=list(range(0, 96, 3)), q_heads=[1, 3])
    apply_keep(model, adapter, keep)
    return model, adapter


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_heterogeneous_round_trip(family: str, tmp_path) -> None:
    model, adapter = _hetero(family)
    ref = _logits(model)
    out = save_pruned(model, adapter, tmp_path / "out")
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in out.iterdir())
    meta = json.loads((out / "secateur.json").read_text())
    assert meta["per_layer_config"]["1"]["skip"] == ["attention"]
    assert meta["plain_hf_loadable"] is False
    assert meta["layers"][0]["v_head_dim"] == (16 if family in ("opt", "gemma2") else 8)
    loaded = load_pruned(out)
    loaded.config._attn_implementation = "eager"
    torch.testing.assert_close(_logits(loaded), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "mistral", "qwen2"])
def test_uniform_prune_loads_with_plain_transformers(family: str, tmp_path) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    apply_keep(model, adapter, {i: LayerKeep(mlp=list(range(40)), q_heads=[0, 2]) for i in range(3)})
    ref = _logits(model)
    save_pruned(model, adapter, tmp_path / "o")
    meta = json.loads((tmp_path / "o" / "secateur.json").read_text())
    assert meta["plain_hf_loadable"] is True
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "o", attn_implementation="eager").eval()
    assert plain.config.intermediate_size == 40 and plain.config.num_attention_heads == 2
    torch.testing.assert_close(_logits(plain), ref, atol=1e-5, rtol=1e-4)


def test_existing_output_is_refused_and_crash_leaves_nothing(tmp_path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    save_pruned(model, adapter, tmp_path / "o")
    with pytest.raises(OutputExistsError, match="exists"):
        save_pruned(model, adapter, tmp_path / "o")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "crash") as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    save_pruned(model, adapter, tmp_path / "o", overwrite=True)
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---- the usual save cycle: load_pruned -> save_pretrained -> load_pruned ---------------------------


def _add_bias(model, name: str) -> None:
    """What FLAP's bias compensation leaves: a bias on a linear that had none."""
    mod = model.get_submodule(name)
    mod.bias = torch.nn.Parameter(0.1 * torch.randn(mod.out_features), requires_grad=False)
    mod.secateur_added_bias = True


@pytest.mark.parametrize("family", ["llama", "qwen3", "opt"])
def test_heterogeneous_model_survives_save_pretrained(family: str, tmp_path) -> None:
    """A user loads a pruned model, changes it and saves it the usual way: it loads back exactly with
    load_pruned (shapes and added biases from the safetensors headers, sharded), never with plain HF."""
    model, adapter = _hetero(family)
    if family != "opt":
        _add_bias(model, "model.layers.0.mlp.down_proj")
    save_pruned(model, tmp_path / "a")
    loaded = load_pruned(tmp_path / "a")
    assert loaded.config.model_type == family  # in memory the real type: PEFT and others read it
    with torch.no_grad():
        loaded.get_submodule(f"{adapter.layer_prefix(0)}.{adapter.o}").weight.mul_(0.5)  # "fine-tuned"
    loaded.config._attn_implementation = "eager"
    ref = _logits(loaded)
    loaded.save_pretrained(tmp_path / "b", max_shard_size="20KB")
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "b" / "secateur.json").exists()
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["secateur_model_type"] == family and "load_pruned" in cfg["model_type"]
    with pytest.raises(ValueError, match=r"secateur\.load_pruned"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    again = load_pruned(tmp_path / "b")
    again.config._attn_implementation = "eager"
    torch.testing.assert_close(_logits(again), ref, atol=1e-5, rtol=1e-4)
    # and once more, through Secateur's own writer
    out = save_pruned(again, tmp_path / "c", dtype="bfloat16", max_shard_size="20KB")
    meta = json.loads((out / "secateur.json").read_text())
    assert meta["added_biases"] == ([] if family == "opt" else ["model.layers.0.mlp.down_proj"])
    bf = load_pruned(out)
    assert bf.dtype == torch.bfloat16 and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_uniform_output_in_bf16_and_shards_loads_with_plain_transformers(tmp_path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    apply_keep(model, adapter, {i: LayerKeep(mlp=list(range(40))) for i in range(3)})
    out = save_pruned(model, tmp_path / "o", dtype=torch.bfloat16, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    plain = AutoModelForCausalLM.from_pretrained(out)
    ours = load_pruned(out)
    assert plain.dtype == ours.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(sorted(plain.state_dict().items()), sorted(ours.state_dict().items())):
        assert torch.equal(a, b), n
    ref = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in ref.items())
