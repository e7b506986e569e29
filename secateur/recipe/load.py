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

import difflib
import os
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from secateur.recipe.errors import FieldProblems, KeyPath, RecipeError, RecipeIssue, format_key
from secateur.recipe.reader import Locations, Where, fail_at, resolve_extends
from secateur.recipe.schema import Recipe

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
        fail_at(source, None, (), "expected KEY.PATH=VALUE, for example budget.params=0.3")
    if parts[0] == "extends":
        fail_at(source, None, ("extends",), "extends cannot be overridden; write a recipe that extends")
    try:
        typed = _schema_at(parts)[1]
    except _PathError as e:
        fail_at(source, None, e.path, str(e))
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        fail_at(source, None, tuple(parts), f"value is not valid YAML: {getattr(e, 'problem', None) or e}")
    if isinstance(data.get("model"), str) and parts[0] == "model" and len(parts) > 1:
        data["model"] = {"id": data["model"]}
    node: Any = data
    for n, part in enumerate(typed):
        if isinstance(part, int) and (not isinstance(node, list) or part >= len(node)):
            size = len(node) if isinstance(node, list) else 0
            fail_at(source, None, typed[: n + 1], f"index {part} is past the end of a list of {size}")
        if isinstance(part, str) and not isinstance(node, dict):
            fail_at(source, None, typed[:n], "is not a mapping in this recipe")
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
    data, locs = resolve_extends(top, file, bound, ())
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
        fail_at(source, None, (), "a recipe must be a mapping")
    if "extends" in data:
        fail_at(source, None, ("extends",), "extends is only resolved when loading a recipe file")
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
