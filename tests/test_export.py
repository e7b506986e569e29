"""Export to GGUF (checked by llama.cpp itself) and to DeciLM checkpoints (checked by reading back)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from secateur.api import prune
from secateur.cli import main
from secateur.explain import explain, format_explanation
from secateur.graph.adapters import adapter_for
from secateur.graph.keep import LayerKeep
from secateur.recipe.errors import RecipeError
from secateur.recipe.load import load_recipe
from secateur.runtime.export import ExportError
from secateur.runtime.export import llamacpp as lc
from secateur.runtime.export.decilm import decilm_config, read_decilm, write_decilm
from secateur.runtime.export.gguf import gguf_layout, write_gguf
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.testing import save_tiny, tiny_model

VOCAB = 49152  # SmolLM2's tokenizer, carried over from its GGUF: a vocabulary llama.cpp accepts


def _bias(model: nn.Module, name: str, seed: int) -> None:
    """A bias as FLAP's compensation adds it (on a linear that had none)."""
    g = torch.Generator().manual_seed(seed)
    mod = model.get_submodule(name)
    mod.bias = nn.Parameter(0.1 * torch.randn(mod.out_features, generator=g), requires_grad=False)
    mod.secateur_added_bias = True


def pruned(kind: str, family: str = "llama") -> nn.Module:
    """A tiny 4-layer model (4 query heads in 2 KV groups, 96 MLP channels) pruned to one shape kind."""
    m = tiny_model(family, vocab_size=VOCAB, num_hidden_layers=4, tie_word_embeddings=family == "qwen3")
    keep = {
        "uniform": {i: LayerKeep(mlp=list(range(0, 96, 2))) for i in range(4)},
        "mlp_widths": {i: LayerKeep(mlp=list(range(16 * (i + 2)))) for i in range(4)},
        "q_heads": {0: LayerKeep(q_heads=[0, 2]), 2: LayerKeep(q_heads=[1, 3], mlp=list(range(40)))},
        "kv_groups": {1: LayerKeep(kv_heads=[1]), 3: LayerKeep(kv_heads=[0], mlp=list(range(24)))},
        "branches": {
            0: LayerKeep(drop_attn=True),
            1: LayerKeep(drop_mlp=True),
            2: LayerKeep(drop_attn=True, drop_mlp=True),
            3: LayerKeep(drop_mlp=True),
        },
        "vchannel": {1: LayerKeep(v_channels=[c for g in range(2) for c in range(g * 16, g * 16 + 8)])},
    }[kind]
    apply_keep(m, adapter_for(m.config), keep)
    if kind == "q_heads":  # FLAP: per-layer heads plus biases on the consumers
        _bias(m, "model.layers.0.self_attn.o_proj", 1)
        _bias(m, "model.layers.2.mlp.down_proj", 2)
    return m.eval()


@pytest.fixture(scope="module")
def llama_cpp() -> None:
    reason = lc.available()
    if reason:
        pytest.skip(f"llama.cpp checks skipped: {reason}")


def _ids(n: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ---- what llama.cpp can hold: decided before anything is written ------------------------------------


def test_layout_uses_llama_for_uniform_and_deci_with_exact_zero_branches():
    assert gguf_layout(pruned("uniform"), adapter_for(pruned("uniform").config)).arch == "llama"
    m = pruned("branches")
    lay = gguf_layout(m, adapter_for(m.config))
    assert lay.arch == "deci"
    counts = [(x.n_head, x.n_head_kv, x.n_ff, x.zero_attention, x.zero_mlp) for x in lay.layers]
    assert counts == [
        (1, 1, 96, True, False),  # llama.cpp derives head sizes from layer 0's head count
        (4, 2, 1, False, True),  # n_ff = 0 would drop this layer's attention output too
        (0, 0, 0, False, False),  # a whole removed layer: identity
        (4, 2, 1, False, True),
    ]


@pytest.mark.parametrize("fmt", ["gguf", "decilm"])
def test_narrow_value_heads_are_refused_naming_the_layer(fmt):
    m = pruned("vchannel")
    check = gguf_layout if fmt == "gguf" else decilm_config
    with pytest.raises(ExportError, match=r"layer 1: value heads are 8 wide but query/key heads 16"):
        check(m, adapter_for(m.config))


def test_families_without_a_per_layer_architecture_are_refused():
    m = tiny_model("qwen3", num_hidden_layers=3)
    apply_keep(m, adapter_for(m.config), {2: LayerKeep(mlp=list(range(40)))})
    with pytest.raises(ExportError, match=r"layer 2: .* llama.cpp's qwen3 architecture reads one width"):
        gguf_layout(m, adapter_for(m.config))
    with pytest.raises(ExportError, match=r"vLLM's DeciLM model has the Llama layout only"):
        decilm_config(m, adapter_for(m.config))
    g = tiny_model("gemma3_text")
    with pytest.raises(ExportError, match=r"'gemma3_text': no llama.cpp architecture"):
        gguf_layout(g, adapter_for(g.config))


def test_a_bias_the_architecture_cannot_load_is_refused(tmp_path, tok_gguf):
    m = tiny_model("qwen2", vocab_size=VOCAB, num_hidden_layers=2)
    _bias(m, "model.layers.1.self_attn.o_proj", 0)
    out = tmp_path / "x.gguf"
    with pytest.raises(
        ExportError, match=r"model.layers.1.self_attn.o_proj.bias: .*qwen2 architecture has no bias"
    ):
        write_gguf(m, adapter_for(m.config), out, tok_gguf, "f32")
    assert not out.exists() and not list(tmp_path.iterdir())


# ---- llama.cpp runs every shape and agrees with PyTorch ----------------------------------------------


@pytest.mark.parametrize(
    "kind,family",
    [
        ("uniform", "llama"),
        ("mlp_widths", "llama"),
        ("q_heads", "llama"),
        ("kv_groups", "llama"),
        ("branches", "llama"),
        ("uniform", "qwen2"),
        ("uniform", "qwen3"),
    ],
)
def test_llama_cpp_logits_match_pytorch(kind, family, tmp_path, tok_gguf, llama_cpp):
    m = pruned(kind, family)
    path = tmp_path / f"{kind}.gguf"
    write_gguf(m, adapter_for(m.config), path, tok_gguf, "f32")
    ids = _ids()
    with torch.no_grad():
        ref = m(ids[None]).logits[0].double()
    with lc.open_gguf(path, n_ctx=64) as llm:
        got = torch.from_numpy(lc.logits(llm, ids.tolist())).double()
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_llama_cpp_perplexity_within_one_percent_at_f16(tmp_path, tok_gguf, llama_cpp):
    m = pruned("q_heads")
    windows = torch.stack([_ids(32, s) for s in range(3)])
    with torch.no_grad():
        logits = m(windows).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), windows[:, 1:].reshape(-1))
    path = tmp_path / "f16.gguf"
    write_gguf(m, adapter_for(m.config), path, tok_gguf, "f16")
    assert abs(lc.perplexity(path, windows) / math.exp(float(nll)) - 1) < 0.01


# ---- DeciLM for vLLM: read back with vLLM's reading of block_configs ---------------------------------


@pytest.mark.parametrize("kind", ["uniform", "q_heads", "kv_groups", "branches"])
def test_decilm_reads_back_to_the_same_logits(kind, tmp_path):
    m = pruned(kind)
    cfg = write_decilm(m, adapter_for(m.config), tmp_path / "d", dtype="f32")
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and len(cfg["block_configs"]) == 4
    if kind == "q_heads":  # 2 query heads per group padded to the global 2 per group (4 heads)
        assert cfg["num_attention_heads"] == 4 and cfg["attention_bias"] and cfg["mlp_bias"]
    back = read_decilm(tmp_path / "d")
    ids = _ids(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=1e-4, atol=1e-4)


# ---- the command line ---------------------------------------------------------------------------------


def test_cli_export_refuses_before_writing_and_writes_beside_the_run(tmp_path, tok_gguf, capsys):
    m = pruned("mlp_widths")
    run = save_pruned(m, adapter_for(m.config), tmp_path / "run")
    assert main(["export", str(run), "--format", "gguf"]) == 2
    assert "pass --tokenizer-gguf" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert main(["export", str(run), "--format", "decilm", "--outtype", "f32"]) == 0
    assert (tmp_path / "run-decilm" / "config.json").is_file()
    assert main(["export", str(run), "--format", "decilm"]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    out = tmp_path / "m.gguf"
    assert (
        main(["export", str(run), "--format", "gguf", "--tokenizer-gguf", str(tok_gguf), "-o", str(out)]) == 0
    )
    assert out.stat().st_size > 0


# ---- a recipe's output.export --------------------------------------------------------------------------


def _tiny_recipe(tmp: Path, export: list, attention: str = "q_head") -> Path:
    model_dir = tmp / "model"
    if not model_dir.exists():
        save_tiny(str(model_dir), "llama")
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer"]
    (tmp / "calib.txt").write_text(" ".join(words[i % 9] for i in range(6000)))
    doc = {
        "version": 1,
        "name": "tiny",
        "model": {"id": str(model_dir), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "split": "validation", "n_samples": 4, "seqlen": 32},
        "targets": {"mlp": True, "attention": attention},
        "budget": {"params": 0.3, "multiple_of": 4},
        "method": "flap",
        "importance": {"metric": "fluctuation"},
        "allocation": {"method": "global"},
        "restore": {"method": "bias_compensation"},
        "evaluate": {"enabled": False},
        "output": {"export": export},
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_recipe_export_writes_a_decilm_checkpoint_inside_the_output(tmp_path):
    recipe = _tiny_recipe(tmp_path, [{"format": "decilm", "outtype": "f32"}])
    explained = format_explanation(explain(load_recipe(recipe), base_dir=tmp_path))
    assert "export output.export.0: decilm f32 -> decilm/" in explained
    out = prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None).output
    assert "decilm" in json.loads((out / ".secateur-output").read_text())["files"]
    ids = torch.randint(0, 128, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(read_decilm(out / "decilm")(ids).logits, load_pruned(out)(ids).logits)


def test_recipe_export_problems_fail_before_any_work(tmp_path):
    recipe = _tiny_recipe(tmp_path, [{"format": "gguf"}])
    with pytest.raises(ExportError, match=r"output.export.0: the source model .* is not a GGUF file"):
        prune(recipe, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()
    bad = _tiny_recipe(tmp_path, [{"format": "decilm"}], attention="v_channel")
    with pytest.raises(RecipeError, match=r"output.export.0.format: decilm export cannot hold value-channel"):
        load_recipe(bad)


def test_overwrite_never_replaces_a_folder_holding_other_files(tmp_path):
    from secateur.runtime.export import atomic_path

    out = tmp_path / "decilm"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="notes.txt"):
        with atomic_path(out, overwrite=True) as target:
            target.mkdir()
            (target / "config.json").write_text("{}")
    assert (out / "notes.txt").read_text() == "keep"
    (out / "notes.txt").unlink()
    (out / "config.json").write_text("old")  # only names an export writes, but not written by one
    with pytest.raises(FileExistsError, match="not a Secateur output"):
        with atomic_path(out, overwrite=True) as target:
            target.mkdir()
    assert (out / "config.json").read_text() == "old"
    shutil.rmtree(out)
    for text in ("first", "second"):  # an export's own folder (its manifest lists it) is replaced
        with atomic_path(out, overwrite=True) as target:
            target.mkdir()
            (target / "config.json").write_text(text)
    assert (out / "config.json").read_text() == "second"
