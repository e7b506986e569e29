"""Docs that run (issue 26 item 7): the README's Python example executes, on a tiny model and a
tiny recipe in place of SmolLM2 and fasp-20.yaml (the same calls, arguments and order)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from secateur.testing import save_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_example() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no Python example"
    return blocks[0]


def test_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:
    tiny = save_tiny(str(tmp_path / "tiny"), "llama", num_hidden_layers=4)  # the example prunes layer 3
    (tmp_path / "c.txt").write_text("pruning makes models smaller and faster. " * 400)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"id": tiny, "dtype": "float32"},
                "calibration": {"dataset": "c.txt", "n_samples": 4, "seqlen": 32},
                "budget": {"params": 0.2},
                "evaluate": {"enabled": False},
            }
        )
    )
    code = _python_example()
    assert 'secateur.load_model("smollm2-135m")' in code and "recipes_examples/fasp-20.yaml" in code
    code = code.replace('"smollm2-135m"', repr(tiny)).replace(
        '"recipes_examples/fasp-20.yaml"', repr(str(recipe))
    )
    code = code.replace("range(1024)", "range(64)")  # the tiny MLP is 96 wide
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "runs" / "x" / "recipe.lock.yaml").is_file()
    assert (tmp_path / "runs" / "x-healed" / "model.safetensors").is_file()


def _quickstart() -> list[str]:
    """The README's quickstart commands, one per line, without their comments."""
    text = README.read_text()
    block = re.search(r"## Quickstart\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README has no quickstart block"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def _tiny_recipe(path: Path, model: str, name: str, **extra: object) -> None:
    doc = {
        "version": 1,
        "name": name,
        "model": {"id": model, "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "c.txt", "n_samples": 8, "seqlen": 32},
        "targets": {"mlp": True, "attention": "none"},
        "budget": {"params": 0.3, "multiple_of": 8},
        "evaluate": {
            "perplexity": [{"dataset": "c.txt", "split": "test", "seqlen": 32, "max_windows": 2}],
            "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
        },
        "output": {"dir": f"runs/{name}"},
        **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_readme_quickstart_commands_run(tmp_path: Path, monkeypatch, capsys) -> None:
    """Every quickstart command, through the CLI's own entry point, on a tiny model and tiny
    versions of the recipes it names (same subcommands, flags and output folders)."""
    import shlex

    from secateur.cli import main
    from secateur.runtime.store.data import default_data_root

    tiny = save_tiny(str(tmp_path / "tiny"), "llama", num_hidden_layers=4)
    (tmp_path / "c.txt").write_text("pruning makes models smaller and faster. " * 400)
    (tmp_path / "recipes_examples").mkdir()
    _tiny_recipe(tmp_path / "recipes_examples" / "fasp-30.yaml", tiny, "fasp-30")
    search = {
        "method": "search",
        "search": {"trials": 3, "heldout_tokens": 256, "pruner": False, "sampler": "random"},
    }
    _tiny_recipe(tmp_path / "recipes_examples" / "search-30.yaml", tiny, "search-30", allocation=search)
    monkeypatch.chdir(tmp_path)
    root = default_data_root()
    ran = []
    for line in _quickstart():
        args = shlex.split(line.replace("smollm2-135m", tiny))
        assert args[0] == ".venv/bin/secateur", line
        args = [{"40": "3", "200": "4"}.get(a, a) for a in args[1:]]  # fewer trials and task examples
        if args[0] == "eval" and not (root and (root / "zeroshot").is_dir()):
            continue  # the zero-shot tasks are read from the data root
        assert main(args) == 0, f"{line}\n{capsys.readouterr().err}"
        ran.append(args[0])
    assert ran[:6] == ["graph", "recipe", "prune", "report", "prune", "search"]
    assert (tmp_path / "runs" / "again" / "recipe.lock.yaml").is_file()


def test_architecture_map_names_only_existing_modules() -> None:
    """docs/ARCHITECTURE.md's "Where does X live" map: every path it names exists."""
    root = README.parent
    text = (root / "docs" / "ARCHITECTURE.md").read_text()
    section = re.search(r"## Where does X live\n(.*?)\n## ", text, re.S)
    assert section, "ARCHITECTURE.md has no 'Where does X live' section"
    paths = re.findall(r"`([\w/]+(?:\.py|/))`", section.group(1))
    assert len(paths) >= 30, paths
    missing = [p for p in paths if not (root / p).exists()]
    assert not missing, f"ARCHITECTURE.md names modules that do not exist: {missing}"
