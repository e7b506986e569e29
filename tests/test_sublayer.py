"""BlockPruner, SPRINT and MultiPruner on tiny local models: budgets, greedy choice, cached
latency table, restoration, save/reload, the pipeline end to end, and bad input."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.groups import layer_shapes
from secateur.recipe.schema import Importance, Restore, Stage, Targets
from secateur.runtime.allocation.proxy import HeldoutScorer, dense_reference
from secateur.runtime.methods import get_method
from secateur.runtime.methods.blockpruner_sprint import (
    Candidate,
    Restorer,
    candidates,
    latency_table,
    without,
)
from secateur.runtime.prune.stage import StageContext
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.testing import save_tiny, tiny_model, tiny_tokenizer

from .conftest import input_ids

FAMILIES = ("llama", "gemma3_text", "opt")


def _ctx(
    model: torch.nn.Module,
    method: str,
    count: int,
    tmp_path: Path,
    layers: list[int] | None = None,
    targets: Targets | None = None,
    metric: str = "fasp",
    restore: str = "least_squares",
    calib: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
) -> StageContext:
    stage = Stage(
        ("passes", 0),
        method,
        targets or Targets(sublayers=True, mlp=False),
        Importance(metric=metric),  # type: ignore[arg-type]
        Restore(method=restore),  # type: ignore[arg-type]
    )
    return StageContext(
        model,
        adapter_for(model.config),
        input_ids(batch=8, seq=32, seed=0) if calib is None else calib,
        input_ids(batch=4, seq=32, seed=1) if heldout is None else heldout,
        stage,
        None,
        count,
        list(range(model.config.num_hidden_layers)) if layers is None else layers,
        progress=False,
        log=lambda s: None,
        cache_dir=str(tmp_path / "cache"),
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["blockpruner", "sprint"])
def test_budget_reached_result_runs_saves_and_reloads(tmp_path: Path, family: str, method: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    total = decoder_linear_params(model, adapter)
    target = int(0.3 * total)
    res = get_method(method)(_ctx(model, method, target, tmp_path))
    removed = total - decoder_linear_params(model, adapter)
    assert removed == res.extra["removed_params"] >= target
    # greedy stops at the first step that meets the budget: one sublayer fewer would not
    assert removed - res.extra["removed_params_per_step"][-1] < target
    assert res.extra["steps"] == len(res.logs) == len(res.extra["removed_params_per_step"])
    assert res.extra["candidate_evals"] > 0 and res.extra["seconds_per_candidate"] > 0
    skipped = {
        (b, i)
        for i in range(3)
        for b, key in (("attn", "skip_attention"), ("mlp", "skip_mlp"))
        if layer_shapes(model, adapter, i)[key]
    }
    assert skipped == {(b, i) for b, i in res.extra["removed"]}
    for i, lk in res.keep.items():
        assert lk.drop_attn == (("attn", i) in skipped) and lk.drop_mlp == (("mlp", i) in skipped)
    yaml.safe_dump(res.extra)  # the lock stores `extra` for non-FASP stages: plain data only
    ids = input_ids(batch=2, seq=16, seed=5)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    out = save_pruned(model, adapter, tmp_path / "out")
    meta = json.loads((out / "secateur.json").read_text())
    names = {"attn": "attention", "mlp": "mlp"}
    assert {(b, int(i)) for i, o in meta["per_layer_config"].items() for b in o.get("skip", [])} == {
        (names[b], i) for b, i in skipped
    }
    loaded = load_pruned(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)


def test_blockpruner_removes_the_harmless_sublayer_first(tmp_path: Path) -> None:
    model = tiny_model("llama")
    with torch.no_grad():  # layer 1's MLP now adds almost nothing to the residual stream
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    res = get_method("blockpruner")(_ctx(model, "blockpruner", 1, tmp_path))
    assert res.extra["removed"] == [["mlp", 1]] and res.extra["metric"] == "kl"
    assert res.extra["candidate_evals"] == 6  # attention and MLP of 3 layers, one step


def test_blockpruner_ppl_choice_is_the_best_candidate(tmp_path: Path) -> None:
    """With metric ppl_delta the removed sublayer is the one whose removal gives the lowest held-out
    perplexity, checked against full forwards of every candidate."""
    model = tiny_model("opt")
    adapter = adapter_for(model.config)
    held = input_ids(batch=4, seq=32, seed=1)
    ppl = {}
    for c in candidates(model, adapter, [0, 1, 2], Targets(sublayers=True, mlp=False)):
        with without(model, adapter, c), torch.no_grad():
            logits = model(held).logits[:, :-1]
            ppl[(c.name, c.layer)] = float(
                F.cross_entropy(logits.reshape(-1, 128), held[:, 1:].reshape(-1)).exp()
            )
    res = get_method("blockpruner")(_ctx(model, "blockpruner", 1, tmp_path, metric="ppl_delta", heldout=held))
    best = min(ppl, key=ppl.get)
    assert res.extra["removed"] == [list(best)] and res.extra["metric"] == "ppl"
    assert res.extra["proxy_per_step"][0] == pytest.approx(ppl[best], rel=1e-4)


def test_blocks_target_removes_whole_layers(tmp_path: Path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    res = get_method("blockpruner")(
        _ctx(model, "blockpruner", 1, tmp_path, targets=Targets(blocks=True, mlp=False))
    )
    (i,) = {i for _, i in res.extra["removed"]}
    assert sorted(b for b, _ in res.extra["removed"]) == ["attn", "mlp"]
    sh = layer_shapes(model, adapter, i)
    assert sh["skip_attention"] and sh["skip_mlp"] and res.extra["candidate_evals"] == 3


@pytest.mark.parametrize("family", ["gemma3_text", "opt"])
def test_cached_layer_inputs_score_like_a_full_forward(family: str) -> None:
    """Scoring a candidate from the cached inputs of its layer equals the KL of a full forward."""
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    held = input_ids(batch=4, seq=24, seed=3)
    ref = dense_reference(model, held, 2, 64, 16)
    with torch.no_grad():
        p = F.log_softmax(model(held).logits[:, :-1].float(), -1)
    scorer = HeldoutScorer(model, adapter, held, ref, "kl", batch_size=2)
    targets = Targets(sublayers=True, blocks=True, mlp=False)
    for c in candidates(model, adapter, [0, 1, 2], targets):
        with without(model, adapter, c), torch.no_grad():
            cached = scorer.value(c.layer)
            q = F.log_softmax(model(held).logits[:, :-1].float(), -1)
        direct = float((p.exp() * (p - q)).sum(-1).mean())
        assert cached == pytest.approx(direct, rel=1e-4, abs=1e-7), c
    # and the model is untouched afterwards
    with torch.no_grad():
        torch.testing.assert_close(F.log_softmax(model(held).logits[:, :-1].float(), -1), p)


def test_sprint_latency_table_is_cached(tmp_path: Path) -> None:
    model = tiny_model("gemma3_text")
    adapter = adapter_for(model.config)
    first = latency_table(model, adapter, tmp_path, repeats=2)
    assert not first.cached and first.path.is_file() and first.path.parent == tmp_path
    assert first.path.name.startswith("latency-gemma3_text-cpu-")
    assert all(v["attn"] > 0 and v["mlp"] > 0 for v in first.per_layer.values())
    doc = json.loads(first.path.read_text())
    assert len(doc["entries"]) == 2  # sliding and full attention layers measured once each
    for e in doc["entries"].values():
        e["attn"] = 123.0
    first.path.write_text(json.dumps(doc))
    second = latency_table(model, adapter, tmp_path, repeats=2)
    assert second.cached and second.path == first.path
    assert all(v["attn"] == 123.0 for v in second.per_layer.values())  # read back, not re-measured


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_sprint_restoration_lowers_kl_to_dense(tmp_path: Path, family: str) -> None:
    dense = tiny_model(family)
    calib, fresh = input_ids(batch=16, seq=128, seed=10), input_ids(batch=16, seq=128, seed=11)
    with torch.no_grad():
        p = F.log_softmax(dense(fresh).logits.float(), -1)
    kl, extras = {}, {}
    for restore in ("least_squares", "none"):
        model = copy.deepcopy(dense)
        # one candidate (layer 1's block), so the choice cannot depend on measured latencies
        targets = Targets(blocks=True, mlp=False)
        ctx = _ctx(model, "sprint", 1, tmp_path, [1], targets, restore=restore, calib=calib)
        res = get_method("sprint")(ctx)
        with torch.no_grad():
            q = F.log_softmax(model(fresh).logits.float(), -1)
        kl[restore] = float((p.exp() * (p - q)).sum(-1).mean())
        extras[restore] = res.extra
    assert extras["least_squares"]["removed"] == extras["none"]["removed"]  # same choice, one step
    assert kl["least_squares"] < 0.9 * kl["none"]
    ls = extras["least_squares"]
    assert ls["restore"] == "least_squares" and ls["restoration_s"] > 0 and ls["restore_windows"] == 16
    assert ls["restoration_kept_per_step"] == [True]
    assert extras["none"]["restoration_s_per_step"] == [0.0]


@pytest.mark.parametrize("family,direct", [("llama", True), ("opt", True), ("gemma3_text", False)])
def test_restorer_matches_the_residual_stream_where_branches_add_to_it(family: str, direct: bool) -> None:
    """Pre-norm layers add o_proj / down_proj outputs straight to the stream (residual target);
    Gemma's sandwich norms do not (dense-output target)."""
    model = tiny_model(family)
    r = Restorer(model, adapter_for(model.config), input_ids(batch=2, seq=16, seed=0), 0.01, 2)
    _, xd, yd, found = r._dense_layer(1, r.inputs.hidden, r.inputs.kwargs[1])
    assert found is direct and set(xd) == set(yd) and len(xd) == 2


def test_residual_target_beats_dense_output_target(tmp_path: Path) -> None:
    dense = tiny_model("llama")
    adapter = adapter_for(dense.config)
    calib, fresh = input_ids(batch=16, seq=128, seed=10), input_ids(batch=16, seq=128, seed=11)
    with torch.no_grad():
        p = F.log_softmax(dense(fresh).logits.float(), -1)
    kl = {}
    for target in ("residual", "output"):
        model = copy.deepcopy(dense)
        restorer = Restorer(model, adapter, calib, 0.01, 4, target=target)
        cand = Candidate(0, ("mlp",))
        apply_keep(model, adapter, {0: cand.keep()})
        errors = restorer.restore(cand)
        assert all(e["restored"] < e["pruned"] for e in errors.values())
        with torch.no_grad():
            q = F.log_softmax(model(fresh).logits.float(), -1)
        kl[target] = float((p.exp() * (p - q)).sum(-1).mean())
    assert kl["residual"] < kl["output"]


def test_restorer_revert_puts_the_same_weights_back() -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    restorer = Restorer(model, adapter, input_ids(batch=4, seq=32, seed=0), 0.01, 2)
    cand = Candidate(0, ("attn",))
    apply_keep(model, adapter, {0: cand.keep()})
    before = {n: p for n, p in model.named_parameters()}
    ids = input_ids(batch=2, seq=16, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    restorer.restore(cand)
    assert any(p is not before[n] for n, p in model.named_parameters())
    restorer.revert()
    assert all(p is before[n] for n, p in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref)


def _text(path: Path, n_chars: int = 40000) -> Path:
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly", "while"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_chars // 5)))
    return path


def _multipruner_recipe(tmp: Path, passes: list[dict], budget: float, allocation: str = "global") -> Path:
    if not (tmp / "model").exists():
        save_tiny(str(tmp / "model"), "llama")
    _text(tmp / "calib.txt")
    doc = {
        "version": 1,
        "name": "tiny-multipruner",
        "model": {"id": str(tmp / "model"), "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "calib.txt", "split": "validation", "n_samples": 8, "seqlen": 64},
        "method": "multipruner",
        "budget": {"params": budget, "multiple_of": 4},
        "allocation": {"method": allocation},
        "passes": passes,
        "evaluate": {"enabled": False},
        "output": {"dir": str(tmp / "out")},
    }
    path = tmp / "multipruner.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


SUBLAYERS = {"name": "sublayers", "method": "blockpruner", "targets": {"sublayers": True, "mlp": False}}
MLP = {"name": "mlp", "method": "fasp", "targets": {"mlp": True, "attention": "none"}}
KV = {"name": "kv", "method": "fasp", "targets": {"mlp": False, "attention": "kv_group"}}


def _check_multipruner(out) -> None:
    dense, pruned = (out.report["size"][k]["decoder_linear_params"] for k in ("dense", "pruned"))
    requested = sum(st["params_to_remove"] for st in out.report["stages"])
    assert requested == pytest.approx(0.3 * dense, abs=3)
    # sublayers overshoot (removed >= asked); FASP's MLP stage rounds to multiple_of per layer
    slack = 3 * 2 * 3 * 64  # half a multiple_of step of MLP channels in each of 3 layers
    assert dense - pruned >= requested - slack
    first = out.report["stages"][0]
    assert first["method"] == "blockpruner" and first["removed_params"] >= first["params_to_remove"]
    assert any(s["skip_attention"] or s["skip_mlp"] for s in out.report["layers"])
    lock = yaml.safe_load((out.output / "recipe.lock.yaml").read_text())
    assert lock["kept"][0] and lock["plans"][0]["removed"] == first["removed"]
    with torch.no_grad():
        assert torch.isfinite(load_pruned(out.output)(input_ids(batch=1, seq=16, seed=7)).logits).all()


def test_multipruner_sublayers_then_mlp_channels(tmp_path: Path) -> None:
    passes = [dict(SUBLAYERS, share=0.44), dict(MLP, share=0.56)]
    recipe = _multipruner_recipe(tmp_path, passes, 0.3, allocation="uniform")
    _check_multipruner(prune(recipe, progress=False, log=lambda s: None))


def test_heldout_windows_from_the_recipe_are_what_blockpruner_scores_on(tmp_path: Path) -> None:
    passes = [dict(SUBLAYERS, share=0.44), dict(MLP, share=0.56)]
    recipe = _multipruner_recipe(tmp_path, passes, 0.3, allocation="uniform")
    over = ["calibration.heldout_windows=3", "calibration.heldout_seqlen=16"]
    out = prune(recipe, overrides=over, progress=False, log=lambda s: None)
    assert out.report["stages"][0]["heldout"] == "3 x 16"


def test_multipruner_44_52_4_with_global_allocation(tmp_path: Path) -> None:
    passes = [dict(SUBLAYERS, share=0.44), dict(MLP, share=0.52), dict(KV, share=0.04)]
    out = prune(_multipruner_recipe(tmp_path, passes, 0.3), progress=False, log=lambda s: None)
    _check_multipruner(out)
    assert any(0 < s["num_kv_heads"] < 2 for s in out.report["layers"])  # stage 3 removed a KV group


def test_mlp_channels_pruned_in_a_layer_whose_attention_was_removed(tmp_path: Path) -> None:
    """MultiPruner's usual path: stage 1 removes an attention branch, stage 2 prunes that layer's MLP."""
    model = tiny_model("llama")
    with torch.no_grad():  # layer 1's attention adds almost nothing: BlockPruner removes it first
        model.model.layers[1].self_attn.o_proj.weight.mul_(1e-4)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    passes = [dict(SUBLAYERS, share=0.3), dict(MLP, share=0.7)]
    recipe = _multipruner_recipe(tmp_path, passes, 0.3, allocation="uniform")
    out = prune(recipe, progress=False, log=lambda s: None)
    assert out.report["stages"][0]["removed"] == [["attn", 1]]
    layer1 = out.report["layers"][1]
    assert layer1["skip_attention"] and 0 < layer1["intermediate_size"] < 96
    with torch.no_grad():
        assert torch.isfinite(load_pruned(out.output)(input_ids(batch=1, seq=16, seed=7)).logits).all()


def test_budget_beyond_sublayer_removal_fails_before_any_work(tmp_path: Path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    total = decoder_linear_params(model, adapter)
    empty = torch.empty(0, 0, dtype=torch.long)  # any data access would fail differently
    for method in ("blockpruner", "sprint"):
        ctx = _ctx(model, method, total // 2, tmp_path, layers=[1], calib=empty, heldout=empty)
        with pytest.raises(
            ValueError, match=rf"^{method} \(stage passes\.0\): .*remove {total // 2:,} param"
        ):
            get_method(method)(ctx)
    assert not (tmp_path / "cache").exists()  # SPRINT did not even measure latencies
    assert decoder_linear_params(model, adapter) == total


def test_stage_without_sublayer_targets_is_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    ctx = _ctx(model, "blockpruner", 100, tmp_path, targets=Targets(mlp=True))
    with pytest.raises(
        ValueError, match=r"blockpruner \(stage passes\.0\): targets\.sublayers and targets\.blocks"
    ):
        get_method("blockpruner")(ctx)


def test_recipe_budget_too_large_names_method_stage_and_value(tmp_path: Path) -> None:
    passes = [dict(SUBLAYERS, share=0.9, targets={"sublayers": True, "layers": [0]}), dict(MLP, share=0.1)]
    recipe = _multipruner_recipe(tmp_path, passes, 0.5, allocation="uniform")
    with pytest.raises(ValueError, match=r"blockpruner \(stage passes\.0\): budget\.params .* pass's share"):
        prune(recipe, progress=False, log=lambda s: None)
