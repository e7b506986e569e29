"""Streamed GGUF export (`runtime/export/gguf_folder.py`): a pruned folder read and written one
tensor at a time gives the in-memory export's file byte for byte, refuses bad folders before
writing, leaves nothing half-written, and its peak memory does not grow with depth."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from secateur.api import prune
from secateur.cli import main
from secateur.export import export
from secateur.graph.adapters import adapter_for
from secateur.graph.keep import LayerKeep
from secateur.runtime.export import ExportError
from secateur.runtime.export import gguf as gguf_mod
from secateur.runtime.export.gguf import write_gguf
from secateur.runtime.export.gguf_folder import folder_skeleton
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import save_pruned
from secateur.runtime.store.leftovers import find
from secateur.runtime.store.weights import SafetensorsSource
from secateur.testing import save_tiny_gguf, tiny_model

VOCAB = 49152  # the tokenizer GGUF's vocabulary (SmolLM2's)


def _pruned(kind: str, family: str) -> nn.Module:
    """A tiny 4-layer model (96 MLP channels, 4 query heads in 2 KV groups) pruned to one shape kind."""
    m = tiny_model(family, vocab_size=VOCAB, num_hidden_layers=4)
    keep = {
        "dense": {},
        "uniform": {i: LayerKeep(mlp=list(range(0, 96, 3))) for i in range(4)},
        "widths": {i: LayerKeep(mlp=list(range(16 * (i + 2)))) for i in range(4)},
        "heads": {0: LayerKeep(q_heads=[0, 2]), 2: LayerKeep(kv_heads=[1], mlp=list(range(40)))},
        "branches": {
            0: LayerKeep(drop_attn=True),
            1: LayerKeep(drop_mlp=True),
            2: LayerKeep(drop_attn=True, drop_mlp=True),
            3: LayerKeep(drop_mlp=True),
        },
    }[kind]
    apply_keep(m, adapter_for(m.config), keep)
    if kind == "heads":  # FLAP's bias compensation on the consumers
        for seed, name in enumerate(("model.layers.0.self_attn.o_proj", "model.layers.2.mlp.down_proj")):
            mod = m.get_submodule(name)
            g = torch.Generator().manual_seed(seed)
            mod.bias = nn.Parameter(0.1 * torch.randn(mod.out_features, generator=g), requires_grad=False)
            mod.secateur_added_bias = True
    return m.eval()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# (kind, family, saved dtype, outtype): every family with a llama.cpp architecture, uniform and
# per-layer (deci) layouts, removed branches (zero fillers), added biases, tied embeddings (qwen3),
# bf16 and f16 sources, every float outtype and q8_0 (with its f16 fallback rows on a dense model)
CASES = [
    ("uniform", "llama", "float32", "f32"),
    ("widths", "llama", "bfloat16", "f16"),
    ("heads", "llama", "float32", "bf16"),
    ("branches", "llama", "float16", "q8_0"),
    ("dense", "llama", "bfloat16", "q8_0"),
    ("widths", "mistral", "float32", "f16"),
    ("uniform", "qwen2", "bfloat16", "f16"),
    ("uniform", "qwen3", "float32", "f16"),
]


@pytest.mark.parametrize("kind,family,dtype,outtype", CASES)
def test_streamed_gguf_equals_in_memory_byte_for_byte(tmp_path, tok_gguf, kind, family, dtype, outtype):
    run = save_pruned(_pruned(kind, family), tmp_path / "run", dtype=dtype, max_shard_size="200KB")
    assert len(list(run.glob("*.safetensors"))) > 1  # a sharded output, read across its shards
    mem = export(run, "gguf", outtype, tmp_path / "mem.gguf", tok_gguf, stream=False)
    streamed = export(run, "gguf", outtype, tmp_path / "streamed.gguf", tok_gguf, stream=True)
    assert mem.stat().st_size > 1e6
    assert _sha(streamed) == _sha(mem)


def test_default_export_streams_and_row_blocks_give_the_same_bytes(tmp_path, tok_gguf, monkeypatch):
    """`secateur export` streams a pruned output by default; with 4 KiB conversion blocks every
    matrix (the 49152-row embedding in blocks of 16 rows) is converted a block of rows at a time."""
    run = save_pruned(_pruned("branches", "llama"), tmp_path / "run")
    mem = export(run, "gguf", "q8_0", tmp_path / "mem.gguf", tok_gguf, stream=False)
    monkeypatch.setattr(gguf_mod, "CHUNK_BYTES", 4096)
    argv = ["export", str(run), "--format", "gguf", "--outtype", "q8_0", "-o", str(tmp_path / "cli.gguf")]
    assert main([*argv, "--tokenizer-gguf", str(tok_gguf)]) == 0
    assert _sha(tmp_path / "cli.gguf") == _sha(mem)


def test_a_folder_whose_weights_disagree_is_refused_before_writing(tmp_path, tok_gguf):
    run = save_pruned(_pruned("widths", "llama"), tmp_path / "run")
    weights = run / "model.safetensors"
    state = load_file(str(weights))
    up = state.pop("model.layers.3.mlp.up_proj.weight")
    save_file(state, str(weights))
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match=r"the weights lack model.layers.3.mlp.up_proj.weight"):
        export(run, "gguf", "f16", out, tok_gguf)
    state["model.layers.3.mlp.up_proj.weight"] = up
    down = "model.layers.1.mlp.down_proj.weight"
    state[down] = state[down][:, :8].contiguous()
    save_file(state, str(weights))
    with pytest.raises(
        ExportError, match=r"down_proj.weight has shape \(64, 8\) in the weights but \(64, 48\)"
    ):
        export(run, "gguf", "f16", out, tok_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with pytest.raises(ExportError, match=r"--stream: only the gguf format"):
        export(run, "decilm", stream=True)


def test_a_failure_mid_write_leaves_no_half_written_gguf(tmp_path, tok_gguf):
    """A read that fails after the header and some tensors are on disk (as a full disk or a
    vanished shard would): no file at the output path, the previous export intact, no leftovers."""
    run = save_pruned(_pruned("branches", "llama"), tmp_path / "run")
    out = export(run, "gguf", "f16", tmp_path / "model.gguf", tok_gguf)
    before = _sha(out)
    model, adapter = folder_skeleton(run)
    source, calls = SafetensorsSource(run), []

    def failing(name: str) -> torch.Tensor:
        calls.append(name)
        if len(calls) == 6:
            raise OSError(f"{name}: read failed")
        return source.get(name)

    with pytest.raises(OSError, match="read failed"):
        write_gguf(model, adapter, out, tok_gguf, "f32", overwrite=True, read=failing)
    assert len(calls) == 6 and _sha(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".secateur-files", "model.gguf", "run"]
    assert not find([tmp_path], deep=True, registry=False)


_CHILD = """
import gc, json, sys
from pathlib import Path
from secateur.export import export

def vm(key):
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024

tmp, tok = Path(sys.argv[1]), sys.argv[2]
rises = {}
for stream in (True, False):
    for n in ("warm", 2, 8):
        if n == "warm" and not stream:
            continue
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current RSS
        start = vm("VmRSS")
        layers = 2 if n == "warm" else n
        export(tmp / f"run-{layers}", "gguf", "f16", tmp / f"{n}-{stream}.gguf", tok, stream=stream)
        rises[f"{n}-{stream}"] = vm("VmHWM") - start
print(json.dumps(rises))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_streamed_export_peak_memory_does_not_grow_with_depth(tmp_path, tok_gguf):
    """Llamas of 2 and 8 layers of 16 MiB (float32): the 8-layer folder is 96 MiB larger. In a child
    process (its own peak), the streamed export's rise may exceed the 2-layer one's by at most a
    quarter of that; loading the model whole, as the in-memory export does, grows by at least half."""
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, head_dim=64)
    for layers in (2, 8):
        m = tiny_model("llama", vocab_size=VOCAB, num_hidden_layers=layers, num_key_value_heads=8, **shape)
        save_pruned(m, tmp_path / f"run-{layers}")
        del m
    size = {n: sum(p.stat().st_size for p in (tmp_path / f"run-{n}").glob("*.safetensors")) for n in (2, 8)}
    assert size[8] - size[2] > 96 * 2**20
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path), str(tok_gguf)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rise = json.loads(done.stdout.strip().splitlines()[-1])
    grown = size[8] - size[2]
    assert rise["8-True"] - rise["2-True"] < grown / 4, {k: v / 2**20 for k, v in rise.items()}
    assert rise["8-False"] - rise["2-False"] > grown / 2, {k: v / 2**20 for k, v in rise.items()}
    assert _sha(tmp_path / "8-True.gguf") == _sha(tmp_path / "8-False.gguf")


def test_a_streamed_prune_writes_its_recipe_gguf_exports_as_the_in_memory_prune_does(tmp_path):
    """`output.export` with `model.stream`: the GGUF is written from the shards just saved, one
    tensor at a time, and equals the in-memory prune's byte for byte; an export the engine cannot
    hold (q8_0 rows of a pruned width) is left out and reported after the output is saved."""
    save_tiny_gguf(str(tmp_path / "tiny.gguf"))
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer"]
    (tmp_path / "calib.txt").write_text(" ".join(words[i % 9] for i in range(6000)))
    doc = {
        "version": 1,
        "name": "tiny",
        "model": {"id": str(tmp_path / "tiny.gguf"), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "n_samples": 4, "seqlen": 32},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"params": 0.3, "multiple_of": 4},
        "evaluate": {"enabled": False},
        "output": {
            "dtype": "bfloat16",
            "export": [{"format": "gguf"}, {"format": "gguf", "outtype": "q8_0"}],
        },
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(doc))
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        with pytest.raises(
            ExportError, match=rf"pruned model saved to .*out-{stream}, but output.export.1 .*q8_0"
        ):
            prune(tmp_path / "recipe.yaml", output=out, stream=stream, progress=False, log=lambda s: None)
        assert (out / "model-f16.gguf").is_file() and not (out / "model-q8_0.gguf").exists()
        assert "model-f16.gguf" in json.loads((out / ".secateur-output").read_text())["files"]
    assert _sha(tmp_path / "out-True" / "model-f16.gguf") == _sha(tmp_path / "out-False" / "model-f16.gguf")
