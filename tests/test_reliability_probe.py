"""What the held-out reliability probe (bench/reliability_probe.py, issue 29) found, one test each:
every input ends in one clear line naming what is wrong, exit 2, and nothing written or changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from secateur import save_pruned
from secateur.cli import main
from secateur.runtime.store.formats import ModelLoadError
from secateur.runtime.store.loader import load_model
from secateur.testing import CALIBRATION_WORDS, save_tiny, tiny_model, tiny_recipe


def _fails(capsys, args: list[str], *needles: str) -> str:
    assert main(args) == 2  # an uncaught exception (a traceback) would fail the test here
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_search_refuses_a_prune_output_as_its_folder(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    save_pruned(tiny_model("llama"), run)  # a Secateur output, with its manifest
    before = _digest(run)
    r = tiny_recipe(
        tmp_path,
        name="s.yaml",
        allocation={"method": "search", "search": {"trials": 2, "heldout_tokens": 256}},
        budget={"params": 0.3, "multiple_of": 4, "min_keep": 0.2},
    )
    _fails(capsys, ["search", str(r), "-o", str(run), "--quiet", "--no-validate"], str(run), "model output")
    assert _digest(run) == before


def test_search_workers_beyond_the_cores_is_refused(tmp_path: Path, capsys) -> None:
    r = tiny_recipe(tmp_path, name="s.yaml", allocation={"method": "search", "search": {"trials": 2}})
    _fails(capsys, ["search", str(r), "-o", str(tmp_path / "s"), "--workers", "100000"], "--workers 100000")
    assert not (tmp_path / "s").exists()


def test_a_multiple_of_as_wide_as_the_mlp_is_refused_not_ignored(tmp_path: Path, capsys) -> None:
    # with multiple_of 96 a 96-wide MLP can only stay whole; the plan used to fall back to single
    # channels silently and save widths of 64, no multiple of 96
    r = tiny_recipe(tmp_path, budget={"params": 0.2, "multiple_of": 96})
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "multiple_of=96", "(96)")
    assert not (tmp_path / "out").exists()


def test_eval_names_a_non_finite_tensor_instead_of_printing_nan(tmp_path: Path, capsys) -> None:
    save_tiny(str(tmp_path / "nan"), "llama")
    f = tmp_path / "nan" / "model.safetensors"
    st = load_file(str(f))
    st["model.layers.1.mlp.up_proj.weight"][3, :3] = float("nan")
    save_file(st, str(f), metadata={"format": "pt"})
    _fails(
        capsys, ["eval", str(tmp_path / "nan"), "--tasks", "", "--ppl-seqlen", "16"], "up_proj", "non-finite"
    )


def test_eval_with_nothing_to_evaluate_is_an_error(tmp_path: Path, capsys) -> None:
    _fails(capsys, ["eval", str(tmp_path / "any"), "--tasks", ""], "nothing to evaluate", "--ppl-seqlen")


def test_speed_refuses_a_prefill_beyond_the_model_positions(tmp_path: Path, capsys) -> None:
    assert main(["prune", str(tiny_recipe(tmp_path)), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    capsys.readouterr()
    _fails(
        capsys,
        ["speed", str(tmp_path / "run"), "--engine", "torch", "--prefill", "100000"],
        "--prefill 100000",
        "256 positions",
    )


def test_a_config_that_disagrees_with_the_weights_is_named(tmp_path: Path, capsys) -> None:
    save_tiny(str(tmp_path / "wide"), "llama")
    cfg = tmp_path / "wide" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "intermediate_size": 128}))
    r = tiny_recipe(tmp_path, "wide")
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "wide", "config.json")
    _fails(capsys, ["eval", str(tmp_path / "wide"), "--tasks", "", "--ppl-seqlen", "16"], "config.json")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [(), ("tokenizer_config.json",)], ids=["no tokenizer files", "config only"])
def test_a_model_folder_without_tokenizer_files_is_named(
    tmp_path: Path, capsys, keep: tuple[str, ...]
) -> None:
    folder = tmp_path / "notok"
    save_tiny(str(folder), "llama")
    for f in folder.iterdir():
        if "token" in f.name and f.name not in keep:
            f.unlink()
    r = tiny_recipe(tmp_path, "notok")
    err = _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], str(folder), "tokenizer")
    assert "sentencepiece" not in err.lower() and "tokenizer.json" in err
    with pytest.raises(ModelLoadError, match="no tokenizer vocabulary file"):
        load_model(str(folder), dtype="float32", device="cpu")
    assert load_model(str(folder), "float32", "cpu", tokenizer=False).tokenizer is None  # graph still works
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_file_that_is_not_json_is_named(tmp_path: Path, capsys) -> None:
    save_tiny(str(tmp_path / "badtok"), "llama")
    (tmp_path / "badtok" / "tokenizer_config.json").write_text("{{{")
    r = tiny_recipe(tmp_path, "badtok")
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "tokenizer_config.json")


def test_an_empty_calibration_file_is_named(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("")
    r = tiny_recipe(tmp_path, calibration={"dataset": "empty.txt"})
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "empty.txt", "0 tokens")
    assert not (tmp_path / "out").exists()


def test_eval_warns_of_a_perplexity_seqlen_beyond_the_positions(tmp_path: Path, capsys) -> None:
    save_tiny(str(tmp_path / "m"), "llama")  # 256 positions
    (tmp_path / "data" / "wikitext2").mkdir(parents=True)
    (tmp_path / "data" / "wikitext2" / "wiki.test.raw").write_text(" ".join(CALIBRATION_WORDS * 200))
    args = [
        "eval",
        str(tmp_path / "m"),
        "--tasks",
        "",
        "--ppl-seqlen",
        "300",
        "--data-root",
        str(tmp_path / "data"),
    ]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert (
        "perplexity (seqlen 300" in out and "--ppl-seqlen 300 is longer than the model's 256 positions" in err
    )


def test_a_quantised_export_judges_rows_by_the_dense_width_not_the_pruned_config(tmp_path: Path) -> None:
    from secateur.export import _dense_layer
    from secateur.runtime.export import ExportError
    from secateur.runtime.export.gguf import write_gguf

    r = tiny_recipe(tmp_path, budget={"params": 0.1, "multiple_of": 4})
    assert main(["prune", str(r), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    lm = load_model(str(tmp_path / "run"), "float32", "cpu", tokenizer=False)
    width = lm.model.config.intermediate_size  # a uniform output's config.json holds the pruned width
    assert width < 96 and width % 32  # the dense 96 is whole q4_0 blocks, the pruned width is not
    with pytest.raises(ExportError, match=f"ffn_down: rows of {width} values"):  # was: written in f16, rc 0
        write_gguf(
            lm.model,
            lm.adapter,
            tmp_path / "q.gguf",
            tmp_path / "unused.gguf",
            "q4_0",
            dense_layer=_dense_layer(tmp_path / "run"),
        )
    assert not (tmp_path / "q.gguf").exists()


def test_an_output_that_is_a_dangling_symlink_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    r = tiny_recipe(tmp_path)
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "link"), "--quiet"], "symbolic link", "nowhere")
    assert not (tmp_path / "nowhere").exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_seed_beyond_the_generators_and_a_recipe_symlink_loop_are_one_line(tmp_path: Path, capsys) -> None:
    r = tiny_recipe(tmp_path, calibration={"seed": 2**70})
    _fails(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "calibration.seed")
    (tmp_path / "a.yaml").symlink_to(tmp_path / "b.yaml")
    (tmp_path / "b.yaml").symlink_to(tmp_path / "a.yaml")
    _fails(capsys, ["prune", str(tmp_path / "a.yaml"), "-o", str(tmp_path / "out")], "a.yaml")
    assert not (tmp_path / "out").exists()


def test_the_api_takes_a_recipe_as_plain_data_and_build_graph_says_what_it_needs(
    tmp_path, monkeypatch
) -> None:
    from secateur import build_graph
    from secateur.api import prune

    monkeypatch.chdir(tmp_path)  # the recipe's relative calibration file is found from here
    r = tiny_recipe(tmp_path)
    out = prune(
        recipe=yaml.safe_load(r.read_text()), output=tmp_path / "out", progress=False, log=lambda s: None
    )
    assert (out.output / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="overrides apply to a recipe file"):
        prune(recipe=yaml.safe_load(r.read_text()), output=tmp_path / "o2", overrides=["budget.params=0.3"])
    with pytest.raises(TypeError, match="build_graph"):
        build_graph(str(tmp_path / "m"), None)  # type: ignore[arg-type]
