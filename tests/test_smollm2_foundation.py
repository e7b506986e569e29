"""Integration: the real SmolLM2-135M graph, and a pruned save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer

from secateur.graph.build import build_graph, summarize
from secateur.graph.keep import LayerKeep
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned, save_pruned

pytestmark = pytest.mark.integration


def test_smollm2_graph(smollm2) -> None:
    s = summarize(build_graph(smollm2.model, smollm2.adapter), smollm2.model)
    assert s["model_type"] == "llama" and s["num_layers"] == 30
    kinds = s["kinds"]
    assert set(kinds["mlp_channel"]["units_per_layer"].values()) == {1536}
    assert set(kinds["kv_group"]["units_per_layer"].values()) == {3}
    assert set(kinds["q_head"]["units_per_layer"].values()) == {9}
    assert kinds["mlp_channel"]["params_per_unit"]["0"] == 3 * 576
    # a KV group: its k and v rows, three query heads' rows and their o_proj columns
    assert kinds["kv_group"]["params_per_unit"]["0"] == (2 * 64 + 2 * 3 * 64) * 576
    assert kinds["residual"]["units_per_layer"]["all"] == 576
    assert s["total_params"] == 134_515_008


def test_smollm2_pruned_round_trip(smollm2, tmp_path) -> None:
    model = copy.deepcopy(smollm2.model)
    keep = {
        3: LayerKeep(mlp=list(range(0, 1536, 2)), q_heads=[0, 1, 3, 4, 6, 7]),
        7: LayerKeep(kv_heads=[0, 2]),
        29: LayerKeep(drop_mlp=True),
    }
    apply_keep(model, smollm2.adapter, keep)
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    out = save_pruned(model, smollm2.adapter, tmp_path / "p", tokenizer=smollm2.tokenizer)
    loaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ref, atol=1e-4, rtol=1e-4)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello").input_ids == smollm2.tokenizer("hello").input_ids


def test_smollm2_prune_and_lock_reproduce_bit_identical(smollm2, tmp_path) -> None:
    """FASP on the last two layers of the real model; the lock re-applies to identical weights."""
    import yaml

    from secateur.api import prune
    from secateur.lock import LOCK_NAME
    from secateur.runtime.store.data import default_data_root

    root = default_data_root()
    if root is None:
        pytest.skip("no data root")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"id": "smollm2-135m", "dtype": "float32", "device": "cpu"},
                "calibration": {
                    "dataset": "wikitext2",
                    "n_samples": 4,
                    "seqlen": 128,
                    "data_root": str(root),
                },
                "targets": {"mlp": True, "attention": "q_head", "layers": ["28-29"]},
                "budget": {"params": 2000000, "multiple_of": 8},
                "evaluate": {"enabled": False},
            }
        )
    )
    out = prune(recipe, output=tmp_path / "a", progress=False, log=lambda s: None)
    kept = out.lock["kept"][0]
    assert set(kept) == {"28", "29"} and len(kept["28"]["q_heads"]) < 9
    again = prune(
        lock_path=tmp_path / "a" / LOCK_NAME, output=tmp_path / "b", progress=False, log=lambda s: None
    )
    assert again.reproduced is True
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    # saved in the original checkpoint's dtype (bf16 for SmolLM2; the GGUF is Q4_1), with the
    # GGUF's bos/eos ids in generation_config.json and the hub id as the card's base model
    import json

    from huggingface_hub import ModelCard

    a = tmp_path / "a"
    assert json.loads((a / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_pruned(a).dtype == torch.bfloat16
    gen = json.loads((a / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert ModelCard.load(a / "README.md").data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (a / "model.safetensors").stat().st_size < 135_000_000 * 2 * 1.05
