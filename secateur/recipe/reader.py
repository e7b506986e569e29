"""Reading one recipe file: safe YAML (plain data tags only, bounded size and alias expansion),
the line of every key, and `extends:` composition inside the recipes root.

`load` turns what this returns into a validated `Recipe` (overrides, error messages).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import yaml

from secateur.recipe.errors import KeyPath, RecipeError, RecipeIssue

MAX_BYTES = 1_000_000  # a recipe is a page of YAML, not a data set
MAX_NODES = 100_000  # bounds alias expansion ("billion laughs")
MAX_EXTENDS_DEPTH = 16

_YAML = "tag:yaml.org,2002:"
# plain data only: the tags SafeLoader resolves implicitly; explicit !!python/..., !!set, ... are refused
ALLOWED_TAGS = frozenset(
    _YAML + t for t in ("str", "int", "float", "bool", "null", "seq", "map", "merge", "timestamp")
)

Where = tuple[str, int | None]  # (file or `--set ARG`, 1-based line)
Locations = dict[KeyPath, Where]


def fail_at(file: str, line: int | None, path: KeyPath, message: str) -> NoReturn:
    raise RecipeError([RecipeIssue(file, line, path, message)])


# ---- YAML with line numbers ---------------------------------------------------------------------


def _children(node: yaml.Node, path: KeyPath) -> Iterator[tuple[KeyPath, yaml.Node, yaml.Node]]:
    """(path, node whose line marks the entry, value node) for each child, keys as raw text."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            yield path + (k.value if isinstance(k, yaml.ScalarNode) else "?",), k, v
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            yield path + (i,), v, v


class _Recursive(Exception):
    """An alias inside the node it refers to: the data would be infinite."""


def _expanded_size(node: yaml.Node, memo: dict[int, int | None]) -> int:
    """Node count with aliases expanded, capped just above MAX_NODES; linear thanks to `memo`."""
    if id(node) in memo:
        size = memo[id(node)]
        if size is None:
            raise _Recursive
        return size
    memo[id(node)] = None  # in progress
    size = 1
    for _, k, v in _children(node, ()):
        size += _expanded_size(v, memo) + (1 if k is not v else 0)
        if size > MAX_NODES:
            break
    memo[id(node)] = size
    return size


def _check_nodes(root: yaml.Node, file: str) -> None:
    """Refuse non-data tags and duplicate keys, all of them at once, before constructing anything."""
    issues: list[RecipeIssue] = []
    stack: list[tuple[KeyPath, yaml.Node, yaml.Node]] = [((), root, root)]
    while stack:
        path, key_node, node = stack.pop()
        bad = next((n for n in (key_node, node) if n.tag not in ALLOWED_TAGS), None)
        if bad is not None:
            tag = bad.tag.replace(_YAML, "!!")
            issues.append(
                RecipeIssue(
                    file,
                    bad.start_mark.line + 1,
                    path if bad is node else path[:-1],  # a bad key is reported at its mapping
                    f"YAML tag {tag!r} is not allowed: a recipe is plain data "
                    "(mappings, lists, strings, numbers, booleans) and nothing in it is executed",
                )
            )
            continue
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != _YAML + "merge":
                    if k.value in seen:
                        issues.append(
                            RecipeIssue(
                                file,
                                k.start_mark.line + 1,
                                path + (k.value,),
                                f"duplicate key (first at line {seen[k.value]})",
                            )
                        )
                    seen.setdefault(k.value, k.start_mark.line + 1)
                elif not isinstance(k, yaml.ScalarNode):
                    issues.append(
                        RecipeIssue(file, k.start_mark.line + 1, path, "keys must be plain scalars")
                    )
        stack.extend(reversed(list(_children(node, path))))
    if issues:
        raise RecipeError(sorted(issues, key=lambda i: i.line or 0))


def _locations(loader: yaml.SafeLoader, root: yaml.Node, file: str) -> Locations:
    """Key path (constructed keys, as text) -> line, over the constructed (merge-flattened) tree."""
    locs: Locations = {(): (file, root.start_mark.line + 1)}
    stack: list[tuple[KeyPath, yaml.Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = str(loader.construct_object(k)) if isinstance(k, yaml.ScalarNode) else "?"
                locs[path + (key,)] = (file, k.start_mark.line + 1)
                stack.append((path + (key,), v))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                locs[path + (i,)] = (file, v.start_mark.line + 1)
                stack.append((path + (i,), v))
    return locs


def _read_document(path: Path, file: str) -> tuple[dict[str, Any], Locations]:
    """One YAML file as a mapping plus its line map; every failure is a RecipeError at file:line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        fail_at(file, None, (), "recipe file not found")
    except OSError as e:
        fail_at(file, None, (), f"cannot read the recipe: {e.strerror or e}")
    if len(raw) > MAX_BYTES:
        fail_at(file, None, (), f"recipe is {len(raw):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        fail_at(file, None, (), f"recipe is not UTF-8 text ({e.reason} at byte {e.start})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            fail_at(file, 1, (), "the recipe is empty; it must be a mapping such as `budget: {params: 0.2}`")
        try:
            too_big = _expanded_size(node, {}) > MAX_NODES
        except _Recursive:
            fail_at(file, 1, (), "the recipe contains a recursive YAML alias")
        if too_big:
            fail_at(file, 1, (), f"recipe has more than {MAX_NODES:,} YAML nodes once aliases are expanded")
        _check_nodes(node, file)
        data = loader.construct_document(node)
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
            fail_at(
                file,
                node.start_mark.line + 1,
                (),
                f"the top level of a recipe must be a mapping of sections (model:, budget:, ...), not {kind}",
            )
        locs = _locations(loader, node, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        fail_at(file, line, (), f"invalid YAML: {e.problem or e.context}")
    except yaml.YAMLError as e:
        fail_at(file, None, (), f"invalid YAML: {e}")
    except RecursionError:
        fail_at(file, None, (), "the recipe is nested too deeply")
    finally:
        loader.dispose()
    data = copy.deepcopy(data)  # YAML aliases share objects; overrides must not write through them
    if isinstance(data.get("model"), str):  # shorthand, expanded so bases and overrides merge per key
        data["model"] = {"id": data["model"]}
        locs[("model", "id")] = locs[("model",)]
    return data, locs


# ---- composition ---------------------------------------------------------------------------------


def _merge(
    base: dict[str, Any], over: dict[str, Any], prefix: KeyPath, replaced: list[KeyPath]
) -> dict[str, Any]:
    """Deep merge: mappings key by key, anything else replaces; records the replaced paths."""
    out = dict(base)
    for k, v in over.items():
        p = prefix + (str(k),)
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, p, replaced)
        else:
            out[k] = v
            replaced.append(p)
    return out


def _merge_with_locations(
    base: tuple[dict[str, Any], Locations], over: tuple[dict[str, Any], Locations]
) -> tuple[dict[str, Any], Locations]:
    replaced: list[KeyPath] = []
    data = _merge(base[0], over[0], (), replaced)
    gone = set(replaced)
    locs = {p: w for p, w in base[1].items() if not any(p[:n] in gone for n in range(1, len(p) + 1))}
    locs.update(over[1])
    return data, locs


def _extends_list(value: Any, file: str, locs: Locations) -> list[tuple[KeyPath, str]]:
    line = locs.get(("extends",), (file, None))[1]
    if isinstance(value, str):
        return [(("extends",), value)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [(("extends", i), v) for i, v in enumerate(value)]
    fail_at(file, line, ("extends",), "extends must be a path or a list of paths to base recipes")


def resolve_extends(
    path: Path, file: str, root: Path, chain: tuple[Path, ...]
) -> tuple[dict[str, Any], Locations]:
    """A recipe with its bases merged in; `chain` holds the files being resolved, for cycles."""
    data, locs = _read_document(path, file)
    bases = _extends_list(data.pop("extends"), file, locs) if "extends" in data else []
    here = chain + (path.resolve(),)
    merged: tuple[dict[str, Any], Locations] = ({}, {})
    for key, ref in bases:
        line = locs.get(key, (file, None))[1]
        target = Path(ref) if Path(ref).is_absolute() else path.parent / ref
        real = target.resolve()
        if not real.is_relative_to(root):
            fail_at(
                file, line, key, f"base recipe {ref!r} resolves to {real}, outside the recipes root {root}"
            )
        if real in here:
            names = [os.path.basename(p) for p in here[here.index(real) :]] + [os.path.basename(real)]
            fail_at(file, line, key, f"extends cycle: {' -> '.join(names)}")
        if len(here) > MAX_EXTENDS_DEPTH:
            fail_at(file, line, key, f"extends chain deeper than {MAX_EXTENDS_DEPTH} files")
        if not real.is_file():
            fail_at(file, line, key, f"base recipe {ref!r} not found (looked for {real})")
        shown = ref if Path(ref).is_absolute() else os.path.normpath(os.path.join(os.path.dirname(file), ref))
        merged = _merge_with_locations(merged, resolve_extends(target, shown, root, here))
    own = {p: w for p, w in locs.items() if not p or p[0] != "extends"}
    return _merge_with_locations(merged, (data, own))
