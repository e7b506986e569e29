"""The package stack stays one-way: graph <- recipe <- runtime <- search <- secateur.

Every import of every module is walked, function-local ones included; an import of a higher
package, or of a private name from another package, fails with the file and line, and so does
an import cycle between modules (one closed by an import inside a function counts too; imports
under `if TYPE_CHECKING:` do not run and do not count).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import networkx as nx

from secateur.recipe.schema import Method, PassMethod
from secateur.runtime.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
STACK = ["graph", "recipe", "runtime", "search", "secateur"]


def _files(root: Path, folder: str) -> list[Path]:
    """The modules of one package of the stack: secateur/<folder>/, or secateur/ itself without them."""
    base = root / "secateur"
    if folder != "secateur":
        return sorted((base / folder).rglob("*.py"))
    return sorted(p for p in base.rglob("*.py") if p.relative_to(base).parts[0] not in STACK)


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "secateur":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in STACK[:-1] else "secateur"


def _imports(path: Path, folder: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported package, imported names) for every secateur import in `path`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the same package
                out.append((node.lineno, folder, [a.name for a in node.names]))
            elif node.module and _package_of(node.module):
                out.append((node.lineno, _package_of(node.module), [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, _package_of(a.name), []) for a in node.names if _package_of(a.name)]
    return out


def layering_violations(root: Path = ROOT) -> list[str]:
    problems = []
    for folder in STACK:
        for path in _files(root, folder):
            for line, pkg, names in _imports(path, folder):
                where = f"{path.relative_to(root)}:{line}"
                if STACK.index(pkg) > STACK.index(folder):
                    problems.append(f"{where}: {folder} imports upward from {pkg}")
                private = [n for n in names if n.startswith("_")]
                if pkg != folder and private:
                    problems.append(f"{where}: private name(s) {private} taken from {pkg}")
    return problems


def _module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the five packages."""
    out = {}
    for folder in STACK:
        pkg = "secateur" if folder == "secateur" else f"secateur.{folder}"
        home = root / "secateur" / ("" if folder == "secateur" else folder)
        for path in _files(root, folder):
            parts = [p for p in path.relative_to(home).with_suffix("").parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (anywhere, functions included), not those under TYPE_CHECKING."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]


def import_cycles(root: Path = ROOT) -> list[list[str]]:
    """Each set of modules that import one another in a cycle, function-level imports included."""
    modules = _module_names(root)
    graph = nx.DiGraph()
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    continue
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in targets]
            else:
                targets = [a.name for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph.add_edge(name, t)
    return sorted(sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1)


def test_no_import_cycles() -> None:
    assert import_cycles() == []


def test_the_cycle_checker_sees_function_level_imports(tmp_path: Path) -> None:
    pkgs = tmp_path / "secateur"
    for folder in STACK[:-1]:
        (pkgs / folder).mkdir(parents=True)
    (pkgs / "runtime" / "a.py").write_text("from secateur.runtime.b import f\n")
    (pkgs / "runtime" / "b.py").write_text("def f():\n    from secateur.runtime import a\n    return a\n")
    (pkgs / "runtime" / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from secateur.runtime.a import x\n"
    )
    (pkgs / "runtime" / "d.py").write_text("from secateur.runtime.c import y\n")
    assert import_cycles(tmp_path) == [["secateur.runtime.a", "secateur.runtime.b"]]


def test_imports_point_down_the_stack() -> None:
    assert layering_violations() == []


def test_the_checker_catches_an_upward_and_a_private_import(tmp_path: Path) -> None:
    pkgs = tmp_path / "secateur"
    for folder in STACK[:-1]:
        (pkgs / folder).mkdir(parents=True)
    (pkgs / "graph" / "bad.py").write_text(
        "def f():\n    from secateur.runtime.prune.surgery import apply_keep\n    return apply_keep\n"
    )
    (pkgs / "search" / "worse.py").write_text("from secateur.runtime.allocation.proxy import _Inject\n")
    found = layering_violations(tmp_path)
    assert any("secateur/graph/bad.py:2: graph imports upward from runtime" in p for p in found)
    assert any(
        "secateur/search/worse.py:1: private name(s) ['_Inject'] taken from runtime" in p for p in found
    )


def test_schema_method_names_are_the_registry() -> None:
    assert sorted(get_args(PassMethod)) == method_names()
    # multipruner is the one composite: a recipe of passes, each a registered method
    assert set(get_args(Method)) == set(method_names()) | {"multipruner"}


def test_top_level_folders_are_links_to_the_packages() -> None:
    """The design card's graph/ recipe/ runtime/ search/ open the packages under secateur/ (one copy)."""
    for folder in STACK[:-1]:
        link = ROOT / folder
        assert link.is_symlink(), f"{folder}/ should be a link to secateur/{folder}"
        assert link.resolve() == (ROOT / "secateur" / folder).resolve()


# Imports sit at module top. Inside a function only: libraries `import secateur` should not pay for
# (transformers and its kin take seconds) or optional extras; the CLI's per-command modules (so
# `secateur --help` stays fast); `secateur.prune` on first use (PEP 562); the prune pipeline in
# `secateur search` only when it validates or compiles; numpy in the llama.cpp worker, a script that
# must import llama_cpp first.
HEAVY = {
    "transformers",
    "accelerate",
    "huggingface_hub",
    "datasets",
    "gguf",
    "tokenizers",
    "peft",
    "lm_eval",
    "llama_cpp",
    "vllm",
    "matplotlib",
}
LOCAL_ANYTHING = {"secateur/cli.py"}
LOCAL_ALSO = {
    "secateur/__init__.py": {"secateur.api"},
    "secateur/runtime/export/llamacpp_worker.py": {"numpy"},
    "secateur/search_cmd.py": {"secateur.api", "secateur.search_validate"},  # the prune pipeline, when used
}


def local_imports(root: Path = ROOT) -> list[str]:
    """`path:line module` for each import inside a function that the rule above does not allow."""
    found = []
    for path in sorted((root / "secateur").rglob("*.py")):
        rel = str(path.relative_to(root))
        if rel in LOCAL_ANYTHING:
            continue
        tree = ast.parse(path.read_text(), rel)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mod = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    top = (mod or "").split(".")[0]
                    if top not in HEAVY and not {top, mod} & LOCAL_ALSO.get(rel, set()):
                        found.append(f"{rel}:{node.lineno} {mod}")
    return sorted(set(found))


def test_imports_sit_at_module_top() -> None:
    assert local_imports() == []
