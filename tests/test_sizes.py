"""Small modules with one job: no module over 500 lines and no function over 80 lines outside bench/.

A module or function that grows past the limit fails here with its path and length; split it by
job (docs/ARCHITECTURE.md says where each job lives) rather than raising the limit.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _sources(root: Path = ROOT) -> list[Path]:
    """Every Python file of the packages, tests and scripts (bench/ is exempt; links are not followed)."""
    return sorted(p for d in ("secateur", "tests", "scripts") for p in (root / d).rglob("*.py"))


def oversized(root: Path = ROOT) -> list[str]:
    """`path: N lines` for each module over the limit, `path:line name: N lines` for each function."""
    found = []
    for path in _sources(root):
        text = path.read_text()
        rel = path.relative_to(root)
        if text.count("\n") > MAX_MODULE_LINES:
            found.append(f"{rel}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    found.append(f"{rel}:{node.lineno} {node.name}: {node.end_lineno - start + 1} lines")
    return found


def test_no_module_or_function_over_the_limits() -> None:
    assert oversized() == []


def test_the_size_check_sees_a_long_function_and_a_long_module(tmp_path: Path) -> None:
    pkg = tmp_path / "secateur"
    pkg.mkdir()
    (pkg / "long.py").write_text("def f():\n" + "    x = 1\n" * 85)
    (pkg / "big.py").write_text("x = 1\n" * 501)
    assert oversized(tmp_path) == ["secateur/big.py: 501 lines", "secateur/long.py:1 f: 86 lines"]
