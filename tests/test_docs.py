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
