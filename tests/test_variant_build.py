"""The variant database built layer by layer: the same variants as the all-layers path, one layer's
statistics alive at a time, and a stitched prune that streams (`model.stream`) equal to the
in-memory one, weights and lock."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from secateur.api import prune
from secateur.runtime.allocation.variant_build import build_variants
from secateur.runtime.allocation.variants import (
    VariantStore,
    dense_layer_stats,
    make_variant,
    store_key,
)
from secateur.runtime.prune.stats import InputStats
from secateur.runtime.store.weights import SafetensorsSource
from secateur.testing import save_tiny, tiny_recipe

from .conftest import input_ids, search_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls on one thread

LAYERS = [0, 1, 2, 3]
CALIB = input_ids(batch=8, seq=32, seed=0)
SCORING = ("fasp", "least_squares", 0.01)
# every kind, branch removals (count 0) among them, in every layer
WANTED = [
    *[(i, "mlp", c) for i in LAYERS for c in (96 - 8 * (i + 1), 40, 0)],
    *[(i, "kv_groups", c) for i in LAYERS for c in (1, 0)],
    *[(i, "q_per_group", 1) for i in LAYERS],
]


def _contents(folder: Path) -> dict[str, tuple[dict[str, str], dict[str, torch.Tensor]]]:
    """Each variant file's metadata and tensors (safetensors writes the metadata's keys in a hash
    map's order, which changes between processes, so the raw bytes are compared through these)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        out[f.name] = (meta, load_file(str(f)))
    return out


def test_layer_by_layer_build_stores_the_all_layers_variants(tmp_path: Path) -> None:
    m, a = search_model()
    key = store_key(m, CALIB, *SCORING)
    per_layer = VariantStore(tmp_path / "per-layer", key)
    built = build_variants(m, a, per_layer, CALIB, WANTED, LAYERS, True, True, SCORING, progress=False)
    assert built.built == len(WANTED) == per_layer.built
    # the previous path: every layer's statistics first, then each variant from them
    stats, angular = dense_layer_stats(m, a, CALIB, LAYERS, True, True, "fasp")
    direct = VariantStore(tmp_path / "direct", key)
    for i, kind, count in WANTED:
        direct.get(
            i, kind, count, lambda i=i, k=kind, c=count: make_variant(m, a, i, stats[i], k, c, *SCORING[1:])
        )
    got, want = _contents(per_layer.folder), _contents(direct.folder)
    assert got.keys() == want.keys() and len(got) == len(WANTED)
    for name, (meta, tensors) in want.items():
        assert got[name][0] == meta, name  # the metadata carries the sha256 of the tensors
        assert got[name][1].keys() == tensors.keys()
        assert all(torch.equal(got[name][1][k], t) for k, t in tensors.items()), name
    # the scores are kept (what a search selects by), the statistics are not
    assert built.angular == angular
    for i in LAYERS:
        assert built.layers[i].stats == {}
        assert built.layers[i].n_units == stats[i].n_units
        assert all(torch.equal(built.layers[i].scores[k], s) for k, s in stats[i].scores.items())
    # a second build finds everything stored and builds nothing; a damaged file is rebuilt
    f = per_layer.path(2, "mlp", 40)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.warns(UserWarning, match=f"{f.name} is unreadable.*rebuilding it"):
        again = build_variants(
            m,
            a,
            VariantStore(tmp_path / "per-layer", key),
            CALIB,
            WANTED,
            LAYERS,
            True,
            True,
            SCORING,
            progress=False,
        )
    assert again.built == 1 and _contents(per_layer.folder)[f.name][0] == want[f.name][0]


class _Alive:
    """Weak references to every layer's statistics as they arrive: how many layers' are alive at once."""

    def __init__(self) -> None:
        self.refs: dict[int, list[weakref.ref[InputStats]]] = {}
        self.most = 0

    def __call__(self, i: int, stats: dict[str, InputStats]) -> None:
        gc.collect()
        self.refs[i] = [weakref.ref(s) for s in stats.values()]
        alive = [j for j, refs in self.refs.items() if any(r() is not None for r in refs)]
        self.most = max(self.most, len(alive))


@pytest.mark.parametrize("keep_stats", [False, True])
def test_one_layers_statistics_alive_at_a_time(tmp_path: Path, keep_stats: bool) -> None:
    m, a = search_model()
    store = VariantStore(tmp_path, store_key(m, CALIB, *SCORING))
    alive = _Alive()
    built = build_variants(
        m, a, store, CALIB, WANTED, LAYERS, True, True, SCORING,
        keep_stats=keep_stats, progress=False, observe=alive,
    )  # fmt: skip
    assert alive.refs.keys() == set(LAYERS) and store.built == len(WANTED)
    # the statistics of each earlier layer are gone when the next arrives (kept: all of them alive)
    assert alive.most == (len(LAYERS) if keep_stats else 1)
    assert all(bool(ls.stats) == keep_stats for ls in built.layers.values())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    src = SafetensorsSource(folder)
    return {k: src.get(k) for k in sorted(src.names())}


# one family with attention structures (KV groups, query heads per group), one MLP only
CASES = {
    "llama-kv_group": ("llama", {"mlp": True, "attention": "kv_group"}),
    "qwen2-q_head": ("qwen2", {"mlp": True, "attention": "q_head"}),
    "qwen2-mlp": ("qwen2", {"mlp": True, "attention": "none"}),
    "mistral-table": ("mistral", {"mlp": True, "attention": "kv_group"}),
}


@pytest.mark.parametrize("case", CASES)
def test_streamed_stitched_prune_equals_in_memory(tmp_path: Path, case: str) -> None:
    family, targets = CASES[case]
    save_tiny(str(tmp_path / "m"), family)
    alloc = {"compile": "stitched"}
    if case == "mistral-table":  # pinned layers, the rest uniform: layers differ in what they keep
        alloc |= {"method": "table", "table": {"0": 0.5, "1": {"mlp": 0.9, "attention": 1.0}}}
    runs = {}
    for mode in ("mem", "stream"):
        over = {"allocation": {**alloc, "variants_dir": str(tmp_path / f"db-{mode}")}}
        rec = tiny_recipe(tmp_path, name=f"{mode}.yaml", targets=targets, budget={"params": 0.3}, **over)
        quiet = dict(overwrite=True, progress=False, log=lambda s: None)
        runs[mode] = prune(rec, output=tmp_path / mode, stream=mode == "stream", **quiet)
    mem, streamed = runs["mem"], runs["stream"]
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert mem.lock["fingerprints"] == streamed.lock["fingerprints"]
    assert mem.lock["kept"] == streamed.lock["kept"] and mem.lock["kept"][0]
    assert mem.lock["plans"] == streamed.lock["plans"]
    for name in ("config.json", "secateur.json"):
        assert (tmp_path / "mem" / name).read_text() == (tmp_path / "stream" / name).read_text()
    # both built their own database under the same key (the streamed fingerprint of the dense
    # weights is the in-memory one), with the same variants in it
    (fm,), (fs,) = (list((tmp_path / f"db-{m}").iterdir()) for m in ("mem", "stream"))
    assert fm.name == fs.name
    got, want = _contents(fs), _contents(fm)
    assert got.keys() == want.keys() and got
    assert all(got[n][0] == want[n][0] for n in want)
    stage = streamed.report["stages"][0]["variants"]
    assert stage["built"] == len(got) and "stream" in streamed.report
    assert set(stage["build_s_per_layer"]) == {str(i) for i in range(len(streamed.report["layers"]))}
    # again, streamed, on the stored database: nothing built, the same model
    over = {"allocation": {**alloc, "variants_dir": str(tmp_path / "db-stream")}}
    rec = tiny_recipe(tmp_path, name="again.yaml", targets=targets, budget={"params": 0.3}, **over)
    again = prune(
        rec, output=tmp_path / "again", stream=True, overwrite=True, progress=False, log=lambda s: None
    )
    assert again.report["stages"][0]["variants"]["built"] == 0
    assert again.lock["fingerprints"] == mem.lock["fingerprints"]


def test_search_cache_keeps_scores_and_reads_statistics_back_from_disk(tmp_path: Path) -> None:
    from secateur.recipe.compile import BudgetSpec
    from secateur.runtime.allocation.space import SearchSpace, level_plans
    from secateur.runtime.allocation.variants import plan_variants
    from secateur.search.cache import SearchCache

    m, a = search_model()
    space = SearchSpace.build(
        m, a, BudgetSpec(fraction=0.3, attention="kv_group", multiple_of=4), LAYERS, levels=3
    )
    wanted = sorted({v for p in level_plans(space) for v in plan_variants(p)})
    held = input_ids(batch=2, seq=32, seed=1)
    cache = SearchCache.build(m, a, CALIB, held, LAYERS, variants_dir=str(tmp_path), wanted=wanted)
    store, spill = cache.source.store, cache.source.spill
    assert store.built == len(wanted) and cache.build_seconds > 0  # the level database, in the pass
    assert all(ls.stats == {} and ls.scores for ls in cache.layers.values())  # scores only in memory
    assert spill is not None and sorted(p.name for p in spill.folder.glob("layer*")) == [
        f"layer{i:03d}.safetensors" for i in LAYERS
    ]
    # a variant off the levels (a rounding step, a seed) is built from the statistics read back:
    # the very one the all-layers path builds
    stats, _ = dense_layer_stats(m, a, CALIB, LAYERS, True, True, "fasp")
    levels = {c for i, k, c in wanted if (i, k) == (1, "mlp")}
    off = next(c for c in range(96, 0, -4) if c not in levels)
    got = cache.source.get(1, "mlp", off)
    want = make_variant(m, a, 1, stats[1], "mlp", off, *SCORING[1:])
    assert store.built == len(wanted) + 1 and got.keep == want.keep
    assert all(torch.equal(got.weights[k][0], w) for k, (w, _) in want.weights.items())
    for name, st in stats[1].stats.items():
        back = spill.get(1)[name]
        assert torch.equal(back.gram, st.gram) and torch.equal(back.col_sum, st.col_sum) and back.n == st.n
    folder = spill.folder
    spill.close()
    assert not folder.exists()
