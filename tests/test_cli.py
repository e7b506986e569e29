"""The command line on real files: graph, recipe schema/validate/show/explain, prune, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from secateur.cli import main
from secateur.testing import save_tiny

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "recipes_examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(save_tiny(str(tmp_path_factory.mktemp("m") / "tiny"), "qwen3"))


def test_graph_json(tiny_dir: Path, capsys) -> None:
    assert main(["graph", str(tiny_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model_type"] == "qwen3"
    assert out["kinds"]["q_head"]["units_per_layer"]["0"] == 4
    assert out["kinds"]["mlp_channel"]["params_per_unit"]["0"] == 3 * 64


def test_unknown_model_type_lists_supported(tmp_path: Path, capsys) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert main(["graph", str(d)]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported" in err and "llama" in err and "opt" in err


def test_missing_model_file(capsys) -> None:
    assert main(["graph", "nowhere/model.gguf"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err


def test_recipe_schema_validate_show(tmp_path: Path, capsys) -> None:
    assert main(["recipe", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "budget" in schema["properties"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: smollm2-135m\nbudget:\n  params: 1.5\n  multipel_of: 8\ntargets:\n  attention: heads\n"
    )
    assert main(["recipe", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "budget.params" in err and "did you mean 'multiple_of'" in err and "targets.attention" in err
    assert f"{bad}:4" in err
    good = tmp_path / "good.yaml"
    good.write_text("budget: {params: 0.25}\n")
    assert main(["recipe", "show", str(good), "--set", "budget.multiple_of=16"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["budget"]["multiple_of"] == 16 and shown["calibration"]["n_samples"] == 128


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_validates_and_explains(path: Path, capsys) -> None:
    assert main(["recipe", "validate", str(path)]) == 0
    assert main(["recipe", "explain", str(path), "--json"]) == 0
    out = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    dense, pruned = out["totals"]["dense"], out["totals"]["pruned"]
    assert all(st["params_to_remove"] > 0 for st in out["stages"])
    if all("note" not in st for st in out["stages"]):  # every stage compiled exactly from shapes
        assert pruned["decoder_linear_params"] < dense["decoder_linear_params"]


def test_explain_counts_units_chosen_at_prune_time(capsys) -> None:
    """fasp-20 allocates from calibration data (proportional): its per-layer table cannot show the
    widths, but its totals must still say 20% of the decoder's linear parameters go, not 0%."""
    assert main(["recipe", "explain", str(EXAMPLES[0].parent / "fasp-20.yaml")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("decoder_linear_params"))
    assert "(20.0% removed)" in line, line
    assert "chosen from calibration data at prune time" in out


def test_prune_and_report(tiny_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "c.txt").write_text("pruning makes models smaller and faster. " * 400)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"id": str(tiny_dir), "dtype": "float32"},
                "calibration": {"dataset": "c.txt", "n_samples": 4, "seqlen": 32},
                "targets": {"attention": "q_head"},
                "budget": {"params": 0.25, "multiple_of": 4},
                "evaluate": {
                    "perplexity": [{"dataset": "c.txt", "split": "test", "seqlen": 32, "max_windows": 2}],
                    "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
                },
                "output": {"dir": str(tmp_path / "out")},
            }
        )
    )
    assert main(["prune", str(recipe), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "prefill tokens/s" in out and "saved to" in out
    assert main(["prune", str(recipe), "--quiet"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "out")]) == 0
    rep = capsys.readouterr().out
    assert "## Quality" in rep and "## Per-layer widths" in rep and "## Speed" in rep
    assert (
        main(
            [
                "prune",
                "--lock",
                str(tmp_path / "out" / "recipe.lock.yaml"),
                "-o",
                str(tmp_path / "o2"),
                "--quiet",
            ]
        )
        == 0
    )
    assert "bit-identical" in capsys.readouterr().out


def test_eval_tasks_path_prints_the_shipped_lm_eval_tasks(capsys) -> None:
    assert main(["eval", "--tasks-path"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    names = {p.stem for p in folder.glob("*.yaml")}
    assert names == {"piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq"}
    assert main(["eval"]) == 2
    assert "PATH is required" in capsys.readouterr().err


def test_eval_prints_perplexity_and_peak_memory(tiny_dir: Path, data_root: Path, capsys) -> None:
    args = ["eval", str(tiny_dir), "--tasks", "", "--ppl-seqlen", "32", "--ppl-windows", "2"]
    assert main([*args, "--data-root", str(data_root)]) == 0
    out = capsys.readouterr().out
    assert "wikitext2 test perplexity (seqlen 32, 2 windows)" in out
    rss = float(out.split("Peak resident memory (RSS) of the process: ")[1].split(" GiB")[0])
    assert rss > 0.05  # torch alone is bigger than that
