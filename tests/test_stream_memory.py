"""Streaming's resident memory: embeddings and head read in place from the safetensors file (only
the pages read count), dropped again after a pass that reads them whole, and the bound that says so."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secateur.explain import explain, format_explanation
from secateur.recipe.load import load_recipe
from secateur.runtime.store.fingerprint import tensor_fingerprint
from secateur.runtime.store.loader import load_model
from secateur.runtime.store.stream import mapped_resident, memory_bound, stream_perplexity
from secateur.runtime.store.weights import SafetensorsSource
from secateur.testing import save_tiny

# an untied head of 8 MiB in float32 (4096 tokens x 512), far more pages than a few windows read
SHAPE = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, tie_word_embeddings=False)


def _smaps() -> list[dict]:
    """/proc/self/smaps as entries: start, end, path and the kB figures (Rss, Anonymous, ...)."""
    out: list[dict] = []
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if (
            "-" in head[0] and ":" not in head[0]
        ):  # an entry's header: "start-end perms offset dev inode path"
            start, end = (int(x, 16) for x in head[0].split("-"))
            out.append({"start": start, "end": end, "path": head[5] if len(head) > 5 else ""})
        elif out and head[0].endswith(":") and len(head) == 3 and head[2] == "kB":
            out[-1][head[0][:-1]] = int(head[1])
    return out


def _mapping(t: torch.Tensor) -> dict:
    """The smaps entry that holds `t`'s memory."""
    return next(e for e in _smaps() if e["start"] <= t.data_ptr() < e["end"])


def _file_rss(folder: Path) -> int:
    """kB of `folder`'s files resident through every map of them this process holds."""
    return sum(e["Rss"] for e in _smaps() if e["path"].startswith(str(folder)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny(str(path), "llama", **SHAPE)
    return path


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")
def test_resident_head_stays_in_the_file_until_read_and_leaves_after(folder: Path) -> None:
    lm = load_model(str(folder), "float32", "cpu", tokenizer=False, stream=True)
    head = lm.model.lm_head.weight
    size_kb = head.numel() * head.element_size() // 1024
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= lm.stream.mapped
    before = _mapping(head)
    # a view of the file's map, unread after loading (though the fingerprint hashed every byte):
    # neither its map nor an earlier one of the same file holds the pages read
    assert before["path"].startswith(str(folder)) and before["Anonymous"] == 0, before
    assert _file_rss(folder) < size_kb / 8
    src = SafetensorsSource(folder)
    assert torch.equal(head, src.get("lm_head.weight"))
    state = {k: v for k, v in lm.model.state_dict().items() if not k.startswith("model.layers.")}
    # the hash of the bytes as read (no layer read yet: the resident tensors only)
    assert lm.stream.dense_fingerprint.hexdigest() == tensor_fingerprint(list(state.items()))
    del state, head  # the test's own references would keep the old maps alive
    windows = torch.randint(1, 127, (2, 16))
    ppl = stream_perplexity(lm.stream, windows)
    assert _mapping(lm.model.lm_head.weight)["Rss"] > size_kb / 2  # perplexity read the whole head
    lm.stream.unmap_resident()
    head = lm.model.lm_head.weight
    assert _mapping(head)["Anonymous"] == 0 and _file_rss(folder) < size_kb / 8
    assert torch.equal(head, src.get("lm_head.weight"))
    assert stream_perplexity(lm.stream, windows) == ppl


def test_a_converted_resident_tensor_is_not_mapped(folder: Path) -> None:
    """float32 weights worked in bfloat16 are copies: none is mapped (or mapped again)."""
    lm = load_model(str(folder), "bfloat16", "cpu", tokenizer=False, stream=True)
    assert lm.stream.mapped == set()
    head = lm.model.lm_head.weight
    lm.stream.unmap_resident()
    assert lm.model.lm_head.weight is head
    assert mapped_resident(folder, lm.model, lm.adapter, torch.bfloat16) == set()
    assert mapped_resident(folder, lm.model, lm.adapter, torch.float32) == {
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    }


def test_rounding_in_place_ends_the_mapping(folder: Path) -> None:
    """round_resident writes the (private) map: mapping the file again would undo it."""
    lm = load_model(str(folder), "float32", "cpu", tokenizer=False, stream=True)
    lm.stream.round_resident(torch.bfloat16)
    rounded = lm.model.lm_head.weight.clone()
    lm.stream.unmap_resident()
    assert torch.equal(lm.model.lm_head.weight, rounded)
    assert torch.equal(SafetensorsSource(folder).get("lm_head.weight").bfloat16().float(), rounded)


def test_bound_counts_only_the_calibration_rows_of_mapped_tensors(folder: Path, tmp_path: Path) -> None:
    lm = load_model(str(folder), "float32", "cpu", tokenizer=False, stream=True)
    m, a = lm.model, lm.adapter
    copied = memory_bound(m, a, torch.float32, 64)
    mapped = memory_bound(m, a, torch.float32, 64, mapped=lm.stream.mapped)
    whole = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("model.layers.")) * 4
    assert copied["resident"] == whole and copied["after_pass"] == 0
    rows = 64 * 512 * 4  # 64 calibration tokens' rows of the embeddings and of the head
    assert mapped["resident"] == 2 * rows + 512 * 4
    # writing and perplexity read the whole head and embeddings with one layer resident
    layer = copied["layer_x2"] // 2
    pass_terms = ("layer_x2", "resident", "activations", "statistics", "solve")
    assert mapped["after_pass"] == max(0, layer + whole - sum(mapped[k] for k in pass_terms))
    assert mapped["total"] == sum(v for k, v in mapped.items() if k != "total")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{id: {folder}, dtype: float32, device: cpu, stream: true}}\n"
        "calibration: {dataset: wikitext2, n_samples: 2, seqlen: 32}\n"
        "targets: {mlp: true, attention: none}\nbudget: {params: 0.2, multiple_of: 8}\n"
    )
    ex = explain(load_recipe(recipe))
    assert ex.stream == memory_bound(m, a, torch.float32, 64, mapped=lm.stream.mapped)
    assert "read in place from the file" in format_explanation(ex)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")
def test_the_decoder_pass_starts_without_the_pages_loading_and_perplexity_read(
    folder: Path, tmp_path: Path
) -> None:
    """Through a real streamed prune: the load's finite check and the dense perplexity read the whole
    head and embeddings; when the pruning stage starts, none of those pages is resident any more."""
    from secateur.api import prune

    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer"]
    (tmp_path / "calib.txt").write_text(" ".join(words[(i * 7) % 9] for i in range(3000)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"version: 1\nmodel: {{id: {folder}, dtype: float32, device: cpu, stream: true}}\n"
        "calibration: {dataset: calib.txt, n_samples: 2, seqlen: 32}\n"
        "targets: {mlp: true, attention: none}\nbudget: {params: 0.2, multiple_of: 8}\n"
        "evaluate: {enabled: true, perplexity: [{dataset: calib.txt, split: test, seqlen: 32, max_windows: 2}]}\n"
    )
    seen: list[int] = []
    head_kb = 4096 * 512 * 4 // 1024

    def log(line: str) -> None:
        if line.startswith("stage 1/1"):
            seen.append(_file_rss(folder))

    result = prune(recipe, output=tmp_path / "out", progress=False, log=log)
    assert len(seen) == 1 and seen[0] < head_kb / 8, seen
    assert result.report["perplexity"]["dense"]  # the dense perplexity did run (and read the head)
