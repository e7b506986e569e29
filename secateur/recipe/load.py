"""Reading recipes: safe YAML only, `extends:` composition, `--set` overrides, errors at file:line.

A recipe is untrusted input from another team. It is read with PyYAML's SafeLoader, any tag
beyond plain data (`!!python/object...`) is refused before anything is constructed, and no
value is ever evaluated. Every problem is reported as `FILE:LINE: key.path: message`, all of
them at once, from a map of key paths to the lines of the YAML node tree.

Composition: `extends: base.yaml` (or a list) names recipes relative to the extending file,
which must stay inside the recipes root (by default the top-level recipe's folder). Bases are
deep-merged in order, then the file itself: mappings merge key by key, lists and scalars
replace. `--set key.path=value` overrides come last; each value is parsed as YAML (`0.3` is a
float, `true` a bool, `[1, 2]` a list) and replaces what was there.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from secateur.recipe.errors import FieldProblems, KeyPath, RecipeError, RecipeIssue, format_key
from secateur.recipe.schema import Recipe

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


def _fail(file: str, line: int | None, path: KeyPath, message: str) -> NoReturn:
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
        _fail(file, None, (), "recipe file not found")
    except OSError as e:
        _fail(file, None, (), f"cannot read the recipe: {e.strerror or e}")
    if len(raw) > MAX_BYTES:
        _fail(file, None, (), f"recipe is {len(raw):,} bytes; the limit is {MAX_BYTES:,}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _fail(file, None, (), f"recipe is not UTF-8 text ({e.reason} at byte {e.start})")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            _fail(file, 1, (), "the recipe is empty; it must be a mapping such as `budget: {params: 0.2}`")
        try:
            too_big = _expanded_size(node, {}) > MAX_NODES
        except _Recursive:
            _fail(file, 1, (), "the recipe contains a recursive YAML alias")
        if too_big:
            _fail(file, 1, (), f"recipe has more than {MAX_NODES:,} YAML nodes once aliases are expanded")
        _check_nodes(node, file)
        data = loader.construct_document(node)
        if not isinstance(data, dict):
            kind = "a list" if isinstance(data, list) else f"a {type(data).__name__}"
            _fail(
                file,
                node.start_mark.line + 1,
                (),
                f"the top level of a recipe must be a mapping of sections (model:, budget:, ...), not {kind}",
            )
        locs = _locations(loader, node, file)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        _fail(file, line, (), f"invalid YAML: {e.problem or e.context}")
    except yaml.YAMLError as e:
        _fail(file, None, (), f"invalid YAML: {e}")
    except RecursionError:
        _fail(file, None, (), "the recipe is nested too deeply")
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
    _fail(file, line, ("extends",), "extends must be a path or a list of paths to base recipes")


def _resolve(path: Path, file: str, root: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], Locations]:
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
            _fail(file, line, key, f"base recipe {ref!r} resolves to {real}, outside the recipes root {root}")
        if real in here:
            names = [os.path.basename(p) for p in here[here.index(real) :]] + [os.path.basename(real)]
            _fail(file, line, key, f"extends cycle: {' -> '.join(names)}")
        if len(here) > MAX_EXTENDS_DEPTH:
            _fail(file, line, key, f"extends chain deeper than {MAX_EXTENDS_DEPTH} files")
        if not real.is_file():
            _fail(file, line, key, f"base recipe {ref!r} not found (looked for {real})")
        shown = ref if Path(ref).is_absolute() else os.path.normpath(os.path.join(os.path.dirname(file), ref))
        merged = _merge_with_locations(merged, _resolve(target, shown, root, here))
    own = {p: w for p, w in locs.items() if not p or p[0] != "extends"}
    return _merge_with_locations(merged, (data, own))


# ---- the schema as a tree of keys, for suggestions and --set ------------------------------------


def _unwrap(ann: Any) -> Any:
    """Strip Annotated and Optional so the shape (model, list, dict, scalar) shows."""
    while True:
        origin = get_origin(ann)
        if origin is Annotated:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(ann) if a is not type(None)]
            if len(args) != 1:
                return ann
            ann = args[0]
        else:
            return ann


def _fields(ann: Any) -> list[str] | None:
    ann = _unwrap(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return list(ann.model_fields)
    return None


class _PathError(Exception):
    def __init__(self, path: KeyPath, message: str) -> None:
        super().__init__(message)
        self.path = path


def _schema_at(path: Sequence[str | int]) -> tuple[Any, KeyPath]:
    """The annotation of the value at `path` and the path with list indices as ints.

    `_PathError` carries the path up to the first bad element and says what is wrong with it.
    """
    ann: Any = Recipe
    typed: list[str | int] = []
    for part in path:
        fields = _fields(ann)
        inner = _unwrap(ann)
        if fields is not None:
            if part not in fields:
                raise _PathError((*typed, part), f"unknown key {part!r}{_suggest(str(part), fields)}")
            ann = inner.model_fields[part].annotation
        elif get_origin(inner) is list:
            if not (isinstance(part, int) or str(part).isdigit()):
                raise _PathError((*typed, part), f"expects a list index here, got {part!r}")
            part = int(part)
            ann = get_args(inner)[0]
        elif get_origin(inner) is dict:
            ann = get_args(inner)[1]
        else:
            raise _PathError((*typed, part), f"{format_key(typed)} is a single value; it has no key {part!r}")
        typed.append(part)
    return ann, tuple(typed)


def _suggest(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(choices)}"


# ---- overrides -----------------------------------------------------------------------------------


def _apply_override(data: dict[str, Any], locs: Locations, arg: str) -> None:
    source = f"--set {arg}"
    key, eq, raw = arg.partition("=")
    parts = [p.strip() for p in key.split(".")]
    if not eq or not all(parts):
        _fail(source, None, (), "expected KEY.PATH=VALUE, for example budget.params=0.3")
    if parts[0] == "extends":
        _fail(source, None, ("extends",), "extends cannot be overridden; write a recipe that extends")
    try:
        typed = _schema_at(parts)[1]
    except _PathError as e:
        _fail(source, None, e.path, str(e))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        _fail(source, None, tuple(parts), f"value is not valid YAML: {getattr(e, 'problem', None) or e}")
    if isinstance(data.get("model"), str) and parts[0] == "model" and len(parts) > 1:
        data["model"] = {"id": data["model"]}
    node: Any = data
    for n, part in enumerate(typed):
        if isinstance(part, int) and (not isinstance(node, list) or part >= len(node)):
            size = len(node) if isinstance(node, list) else 0
            _fail(source, None, typed[: n + 1], f"index {part} is past the end of a list of {size}")
        if isinstance(part, str) and not isinstance(node, dict):
            _fail(source, None, typed[:n], "is not a mapping in this recipe")
        if n == len(typed) - 1:
            node[part] = value
            break
        if isinstance(part, str) and not isinstance(node.get(part), (dict, list)):
            node[part] = [] if isinstance(typed[n + 1], int) else {}  # an absent section
        node = node[part]
    target = typed
    for p in [p for p in locs if p[: len(target)] == target]:
        del locs[p]
    locs[target] = (source, None)


# ---- validation errors -> issues -----------------------------------------------------------------


def _data_path(loc: Sequence[str | int], data: Any) -> KeyPath:
    """The part of a pydantic `loc` that names keys of the recipe (drops union tags like 'str')."""
    out: list[str | int] = []
    node = data
    for el in loc:
        if isinstance(node, dict):
            match = next((k for k in node if str(k) == str(el)), None)
            out.append(str(el))
            if match is None:
                break  # a missing key: name it and stop
            node = node[match]
        elif isinstance(node, list) and isinstance(el, int) and 0 <= el < len(node):
            out.append(el)
            node = node[el]
        else:
            break
    return tuple(out)


def _where(path: KeyPath, locs: Locations, default: str) -> Where:
    for n in range(len(path), -1, -1):
        if path[:n] in locs:
            return locs[path[:n]]
    return (default, None)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: dict[str, Any], path: KeyPath) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        try:
            fields = _fields(_schema_at(path[:-1])[0]) or []
        except _PathError:
            fields = []
        return f"unknown key {path[-1]!r}{_suggest(str(path[-1]), fields) if fields else ''}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error":
        try:
            choices = [str(c) for c in get_args(_unwrap(_schema_at(path)[0]))]
        except _PathError:
            choices = []
        got = err.get("input")
        hint = ""
        if isinstance(got, str) and choices:
            close = difflib.get_close_matches(got, choices, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"{_short(got)} is not one of {err['ctx']['expected']}{hint}"
    error = err.get("ctx", {}).get("error")
    if kind == "value_error" and error is not None:
        return str(error)
    got = err.get("input")
    shown = f" (got {_short(got)})" if not isinstance(got, (dict, list)) else ""
    return f"{err['msg']}{shown}{_exponent_hint(got)}"


def _exponent_hint(got: Any) -> str:
    """YAML 1.1 reads `1e-6` (no dot) as a string: say so where a number was expected."""
    if not isinstance(got, str):
        return ""
    try:
        float(got)
    except ValueError:
        return ""
    return "; YAML reads exponent forms without a dot (1e-6) as text: write 1.0e-6 or 0.000001"


def _issues(exc: ValidationError, data: dict[str, Any], locs: Locations, default: str) -> list[RecipeIssue]:
    issues: list[RecipeIssue] = []
    for err in exc.errors(include_url=False):
        path = _data_path(err["loc"], data)
        error = err.get("ctx", {}).get("error")
        found = error.problems if isinstance(error, FieldProblems) else [((), _message(err, path))]
        for rel, message in found:
            full = path + tuple(rel)
            file, line = _where(full, locs, default)
            issue = RecipeIssue(file, line, full, message)
            if issue not in issues:
                issues.append(issue)
    return sorted(issues, key=lambda i: (i.file != default, i.file, i.line or 0))


def _validate(data: dict[str, Any], locs: Locations, default: str) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_issues(e, data, locs, default)) from None


# ---- public API ------------------------------------------------------------------------------------


def load_recipe(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, root: str | os.PathLike[str] | None = None
) -> Recipe:
    """Read, compose, override and validate a recipe; raises RecipeError listing every problem.

    `root` bounds where `extends:` may reach; it defaults to the recipe's own folder.
    """
    file = os.fspath(path)
    top = Path(file)
    bound = Path(root).resolve() if root is not None else top.resolve().parent
    data, locs = _resolve(top, file, bound, ())
    for arg in overrides:
        _apply_override(data, locs, arg)
    return _validate(data, locs, file)


def validate_file(
    path: str | os.PathLike[str], overrides: Sequence[str] = (), *, root: str | os.PathLike[str] | None = None
) -> list[RecipeIssue]:
    """Every problem of a recipe (empty when it is valid), for `secateur validate` and editors."""
    try:
        load_recipe(path, overrides, root=root)
    except RecipeError as e:
        return e.issues
    return []


def recipe_from_dict(data: dict[str, Any], source: str = "<dict>") -> Recipe:
    """Validate an already parsed recipe (a lock's resolved recipe); errors carry key paths, no lines."""
    if not isinstance(data, dict):
        _fail(source, None, (), "a recipe must be a mapping")
    if "extends" in data:
        _fail(source, None, ("extends",), "extends is only resolved when loading a recipe file")
    return _validate(data, {}, source)


def resolved_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe as plain data (every default filled in), for locks and dumps.
    An unset optional stage (`heal`) and search keys added later at their defaults are left out, so
    recipes without them dump as they always did."""
    data = recipe.model_dump(mode="json", exclude={"extends"})
    for section in [data, *data.get("passes", [])]:
        if section.get("heal", 0) is None:
            del section["heal"]
    search = data.get("allocation", {}).get("search", {})
    for key, default in LATER_SEARCH_DEFAULTS.items():  # keys added later, left out at their defaults
        if key in search and search[key] == default:
            del search[key]
    return data


# allocation.search keys added after recipes were locked (issue 27): a recipe that leaves them at
# these defaults dumps, locks and reports exactly as before
LATER_SEARCH_DEFAULTS = {"objectives": None, "rescore": 3}


def dump_recipe(recipe: Recipe) -> str:
    """YAML of the resolved recipe in schema order; loading it gives an equal Recipe."""
    return yaml.safe_dump(
        resolved_dict(recipe), sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of the recipe language, for editors and other teams' tooling."""
    return Recipe.model_json_schema()


def resolve_recipe_path(
    recipe_file: str | os.PathLike[str],
    value: str | os.PathLike[str],
    data_root: str | os.PathLike[str] | None = None,
) -> Path:
    """A path written in a recipe (a calibration file), resolved against the recipe's folder.

    The result must stay inside that folder, or inside `data_root` when the caller gives one
    (a relative value is tried there when it does not exist next to the recipe). `data_root`
    must come from the caller (CLI flag, environment), not from the recipe itself, or the check
    means nothing. `output.dir` is not resolved here: it may be anywhere the user says, and the
    runtime never writes outside it.
    """
    base = Path(recipe_file).resolve().parent
    allowed = [base] + ([Path(data_root).resolve()] if data_root is not None else [])
    raw = Path(value)
    candidates = [raw] if raw.is_absolute() else [base / raw] + [a / raw for a in allowed[1:]]
    inside = [c.resolve() for c in candidates if any(c.resolve().is_relative_to(a) for a in allowed)]
    if not inside:
        where = " or the data root ".join(str(a) for a in allowed)
        raise ValueError(f"{os.fspath(value)!r} resolves outside the recipe's folder {where}")
    return next((c for c in inside if c.exists()), inside[0])


__all__ = [
    "RecipeError",
    "RecipeIssue",
    "dump_recipe",
    "load_recipe",
    "recipe_from_dict",
    "recipe_json_schema",
    "resolve_recipe_path",
    "resolved_dict",
    "validate_file",
]
