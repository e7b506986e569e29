"""Streaming runtime (model.stream): same saved tensors as the in-memory path, sharded output,
safetensors (sharded) and GGUF sources, refusals of what needs the whole model, peak memory."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.checks import StreamError
from secateur.cli import main
from secateur.runtime.store.formats import INDEX_NAME
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.loader import resolve_source
from secateur.runtime.store.outdir import MANIFEST
from secateur.runtime.store.weights import SafetensorsSource
from secateur.testing import (
    TINY_FAMILIES,
    save_tiny,
    save_tiny_gguf,
    tiny_model,
    tiny_recipe_doc,
    tiny_tokenizer,
)


def _text(path: Path) -> Path:
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly"]
    path.write_text(" ".join(rng.choice(words) for _ in range(4000)))
    return path


def _recipe(tmp: Path, model: str, evaluate: bool = False, **over) -> Path:
    _text(tmp / "calib.txt")
    checks = {
        "enabled": evaluate,
        "perplexity": [{"dataset": "calib.txt", "split": "test", "seqlen": 32, "max_windows": 3}],
        "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
    }
    doc = tiny_recipe_doc(
        model,
        calibration={"dataset": "calib.txt"},
        targets={"attention": "q_head"},
        budget={"params": 0.3},
        evaluate=checks,
    )
    doc.update(over)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(folder)
    return {k: src.get(k) for k in sorted(src.names())}


def _both(recipe: Path, tmp: Path):
    quiet = dict(overwrite=True, progress=False, log=lambda s: None)
    mem = prune(recipe, output=tmp / "mem", **quiet)
    streamed = prune(recipe, output=tmp / "stream", stream=True, **quiet)
    return mem, streamed


def _assert_identical(tmp: Path, mem, streamed) -> None:
    a, b = _tensors(tmp / "mem"), _tensors(tmp / "stream")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert mem.lock["fingerprints"] == streamed.lock["fingerprints"]
    assert mem.lock["kept"] == streamed.lock["kept"]
    for name in ("config.json", "secateur.json", "generation_config.json"):
        assert (tmp / "mem" / name).read_text() == (tmp / "stream" / name).read_text()
    manifest = set(json.loads((tmp / "stream" / MANIFEST).read_text())["files"])
    on_disk = {str(p.relative_to(tmp / "stream")) for p in (tmp / "stream").rglob("*") if p.is_file()}
    assert on_disk - {MANIFEST} <= manifest and "README.md" in manifest


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_prune_saves_the_same_tensors(tmp_path: Path, family: str) -> None:
    save_tiny(str(tmp_path / "model"), family)
    attention = "kv_group" if family == "opt" else "q_head"
    rec = _recipe(tmp_path, str(tmp_path / "model"), targets={"mlp": True, "attention": attention})
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)
    out = tmp_path / "stream"
    n = mem.report["layers"].__len__() + 1  # one shard per layer + embeddings/head under the default size
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert set(json.loads((out / MANIFEST).read_text())["files"]) >= {*shards, INDEX_NAME}
    reloaded = load_pruned(out)
    ref = load_pruned(tmp_path / "mem")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_streamed_output_honours_output_dtype_and_max_shard_size(tmp_path: Path) -> None:
    save_tiny(str(tmp_path / "model"), "llama")
    limit = 24_000
    rec = _recipe(tmp_path, str(tmp_path / "model"), output={"dtype": "bfloat16", "max_shard_size": limit})
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)
    assert streamed.lock["output_dtype"] == mem.lock["output_dtype"] == "bfloat16"
    out = tmp_path / "stream"
    index = json.loads((out / INDEX_NAME).read_text())
    per_shard: dict[str, list[str]] = {}
    for k, f in index["weight_map"].items():
        per_shard.setdefault(f, []).append(k)
    tensors = _tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in tensors.values())
    n_layers = len(mem.report["layers"])
    assert len(per_shard) > n_layers + 1  # some layers are over the limit and split
    for names in per_shard.values():  # HF's rule: at most the limit, unless one tensor alone exceeds it
        assert len(names) == 1 or sum(tensors[k].numel() * 2 for k in names) <= limit
    shards = sorted(per_shard)
    assert shards == [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    assert not list(out.glob("*.partial"))
    reloaded, ref = load_pruned(out), load_pruned(tmp_path / "mem")
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in reloaded.state_dict().items())
    # the in-memory run's lock reproduces streamed
    lock = tmp_path / "mem" / "recipe.lock.yaml"
    again = prune(lock_path=lock, output=tmp_path / "again", stream=True, progress=False, log=lambda s: None)
    assert again.reproduced is True and again.lock["fingerprints"] == mem.lock["fingerprints"]


def test_stream_refuses_decilm_recipe_exports(tmp_path: Path) -> None:
    """GGUF exports stream (tests/test_export_stream.py); a DeciLM export needs the whole model."""
    rec = _recipe(tmp_path, "x", output={"export": [{"format": "gguf"}, {"format": "decilm"}]})
    with pytest.raises(StreamError, match="output.export decilm converts the whole pruned model"):
        prune(rec, output=tmp_path / "out", stream=True, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_sharded_safetensors_source_streams(tmp_path: Path) -> None:
    model = tiny_model("qwen2")
    model.config._attn_implementation = "sdpa"
    model.save_pretrained(str(tmp_path / "model"), max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(str(tmp_path / "model"))
    assert len(list((tmp_path / "model").glob("model-*.safetensors"))) > 2
    mem, streamed = _both(_recipe(tmp_path, str(tmp_path / "model")), tmp_path)
    _assert_identical(tmp_path, mem, streamed)


def test_gguf_source_streams(tmp_path: Path, capsys: pytest.CaptureFixture, data_root: Path) -> None:
    save_tiny_gguf(str(tmp_path / "tiny.gguf"))
    rec = _recipe(tmp_path, str(tmp_path / "tiny.gguf"), evaluate=True)
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)
    assert streamed.report["perplexity"] == mem.report["perplexity"]
    # the streamed output evaluates streamed from the CLI as the in-memory output does in memory
    capsys.readouterr()
    ppl = ["--ppl-seqlen", "64", "--ppl-windows", "2", "--dtype", "float32", "--device", "cpu"]
    ppl += ["--data-root", str(data_root)]
    assert main(["eval", str(tmp_path / "stream"), "--stream", *ppl]) == 0
    streamed_out = [ln for ln in capsys.readouterr().out.splitlines() if "perplexity" in ln]
    assert main(["eval", str(tmp_path / "mem"), "--tasks", "", *ppl]) == 0
    assert streamed_out and streamed_out == [
        ln for ln in capsys.readouterr().out.splitlines() if "perplexity" in ln
    ]


@pytest.mark.parametrize("method", ["bonsai", "blockpruner", "sprint"])
def test_method_that_cannot_stream_refuses_by_name(tmp_path: Path, method: str) -> None:
    targets = {"sublayers": True} if method in ("blockpruner", "sprint") else {"mlp": True}
    rec = _recipe(tmp_path, str(tmp_path / "absent-model"), method=method, targets=targets)
    with pytest.raises(StreamError, match=f"method '{method}' cannot stream"):
        prune(rec, output=tmp_path / "out", stream=True, progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


# allocations that compare layers: a first streamed pass measures the dense layers, a second prunes
TWO_PASS = {
    "proportional": {"allocation": {"method": "proportional"}},
    "global": {"allocation": {"method": "global"}},
    "flap": {
        "method": "flap",
        "importance": {"metric": "fluctuation"},
        "restore": {"method": "bias_compensation"},
    },
}


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("case", TWO_PASS)
def test_two_pass_stream_equals_in_memory(tmp_path: Path, family: str, case: str) -> None:
    save_tiny(str(tmp_path / "model"), family)
    attention = "kv_group" if family == "opt" else "q_head"
    targets = {"mlp": True, "attention": attention}
    rec = _recipe(tmp_path, str(tmp_path / "model"), targets=targets, **TWO_PASS[case])
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)
    widths = {(r["intermediate_size"], r["num_heads"]) for r in mem.report["layers"]}
    if case == "proportional":  # the shares differ per layer: the first pass really measured the layers
        assert len(widths) > 1, mem.report["layers"]


def test_cfsp_streams_from_a_gguf_source(tmp_path: Path) -> None:
    save_tiny_gguf(str(tmp_path / "tiny.gguf"))
    rec = _recipe(
        tmp_path, str(tmp_path / "tiny.gguf"), method="cfsp", targets={"mlp": True, "attention": "none"}
    )
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)


def _vm(key: str) -> int:
    """A /proc/self/status memory figure in bytes (VmRSS, VmHWM)."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _peak_above_start(tmp: Path, layers: int) -> tuple[int, int]:
    """How far a streamed prune of a llama of `layers` 16 MiB layers raises resident memory above
    where it started (VmHWM reset before it), and the model's weight bytes."""
    folder = tmp / f"model-{layers}"
    shape = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, head_dim=64)
    save_tiny(str(folder), "llama", num_hidden_layers=layers, num_key_value_heads=8, **shape)
    rec = _recipe(tmp, str(folder), targets={"mlp": True, "attention": "none"})
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    start = _vm("VmRSS")
    prune(rec, output=tmp / f"out-{layers}", stream=True, progress=False, log=lambda s: None)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return _vm("VmHWM") - start, size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_streamed_peak_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    """2 and 8 layers of 16 MiB: the 8-layer model is 96 MiB larger; the rise of its streamed
    prune's peak may exceed the 2-layer one's by at most a quarter of that (a layer is 16 MiB)."""
    _peak_above_start(tmp_path / "warm", 2)  # first-use allocations (lazy imports, caches) out of the way
    rise2, size2 = _peak_above_start(tmp_path, 2)
    rise8, size8 = _peak_above_start(tmp_path, 8)
    assert size8 - size2 > 96 * 2**20
    assert rise8 - rise2 < (size8 - size2) / 4, (rise2 / 2**20, rise8 / 2**20)


def test_stream_refuses_zero_shot_tasks(tmp_path: Path) -> None:
    rec = _recipe(tmp_path, "x", evaluate=True)
    doc = yaml.safe_load(rec.read_text())
    doc["evaluate"]["tasks"] = ["piqa"]
    rec.write_text(yaml.safe_dump(doc))
    with pytest.raises(StreamError, match="evaluate.tasks"):
        prune(rec, output=tmp_path / "out", stream=True, progress=False, log=lambda s: None)


def test_stream_report_carries_peak_memory_and_bound_and_lock_reapplies(tmp_path: Path) -> None:
    save_tiny(str(tmp_path / "model"), "llama")
    rec = _recipe(tmp_path, str(tmp_path / "model"))
    rec.write_text(rec.read_text().replace("device: cpu", "device: cpu\n  stream: true"))
    # a child process of its own, so the peak is this prune's and not the test process's (in the
    # suite that process already holds hundreds of MB from earlier tests)
    argv = ["prune", str(rec), "-o", str(tmp_path / "out"), "--quiet"]
    code = f"from secateur.cli import main; raise SystemExit(main({argv!r}))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["memory"]["peak_rss_bytes"] > 0
    bound = rep["stream"]["memory_bound_bytes"]
    terms = ("layer_x2", "resident", "activations", "statistics", "solve", "runtime")
    assert bound["total"] == sum(bound[k] for k in terms)
    assert rep["memory"]["peak_rss_bytes"] < 1.2 * bound["total"]  # the tiny model is far inside the bound
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Peak resident memory" in md and "Expected resident memory" in md
    lock = yaml.safe_load((tmp_path / "out" / "recipe.lock.yaml").read_text())
    assert lock["recipe"]["model"]["stream"] is True
    again = prune(lock_path=tmp_path / "out" / "recipe.lock.yaml", output=tmp_path / "again", progress=False)
    assert again.reproduced is True


@pytest.mark.integration
def test_smollm2_streamed_equals_in_memory(tmp_path: Path, data_root: Path) -> None:
    if resolve_source("smollm2-135m").gguf_file is None:
        pytest.skip("SmolLM2 GGUF not installed")
    rec = _recipe(
        tmp_path,
        "smollm2-135m",
        calibration={"dataset": "wikitext2", "n_samples": 2, "seqlen": 64, "data_root": str(data_root)},
        targets={"mlp": True, "attention": "q_head"},
        budget={"params": 0.2, "multiple_of": 8},
    )
    mem, streamed = _both(rec, tmp_path)
    _assert_identical(tmp_path, mem, streamed)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_peak_memory_is_the_programs_own_not_its_parents() -> None:
    """exec keeps the parent's ru_maxrss: a prune started from a big process must not report it."""
    big = bytearray(800 * 2**20)
    big[::4096] = b"x" * len(big[::4096])  # touch every page so the parent's RSS holds 800 MiB
    code = "import torch; from secateur.runtime.measure.timing import peak_memory as p; print(p(torch.device('cpu'))['peak_rss_bytes'])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert int(out.stdout.split()[-1]) < 700 * 2**20  # torch alone is a few hundred MiB
    del big


def test_nonfinite_count_is_exact_across_chunks() -> None:
    """The chunked NaN/inf count (bounded memory on large embeddings) equals the whole-tensor count,
    wherever the bad values fall against the chunk boundaries."""
    from secateur.runtime.store.deliver import count_nonfinite

    t = torch.randn(37, 11, dtype=torch.bfloat16)
    flat = t.view(-1)
    for i in (0, 15, 16, 17, 200, flat.numel() - 1):
        flat[i] = float("nan") if i % 2 else float("inf")
    whole = int((~torch.isfinite(t)).sum())
    assert whole == 6
    for chunk in (1, 7, 16, 1 << 22):
        assert count_nonfinite(t, chunk) == whole


def test_freed_memory_returns_on_glibc() -> None:
    """Streaming asks glibc to mmap large buffers (what keeps a streamed prune's memory flat with depth)."""
    import platform

    from secateur.runtime.store.stream import return_freed_memory

    libc = platform.libc_ver()[0]
    assert return_freed_memory() is (libc == "glibc")
