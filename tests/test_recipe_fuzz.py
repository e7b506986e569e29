"""Property-based fuzzing of recipes: random mutations of the example recipes never end in a
traceback, an invalid recipe never loads a model, and a run never writes outside its output."""

from __future__ import annotations

import copy
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import secateur.pipeline as api
from secateur.cli import main
from secateur.recipe.errors import RecipeError
from secateur.recipe.load import load_recipe, resolved_dict
from secateur.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "recipes_examples").glob("*.yaml"))
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10**7),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "all", "3-7", "re:(", "1e-6", "fasp", "cuda:9", "../x", "q_head", "!!python"]),
    st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.sampled_from(["mlp", "attention", "x", "params"]), st.floats(0, 1), max_size=2),
)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc: dict, rng: random.Random, value: Any, n: int) -> dict:
    """Delete, replace or add keys at random places of the recipe (n times)."""
    for _ in range(n):
        paths = _paths(doc)
        if not paths:
            break
        path = rng.choice(paths)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        op = rng.random()
        if op < 0.3 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.8:
            parent[path[-1]] = copy.deepcopy(value)
        elif isinstance(parent, dict):
            parent[rng.choice(["colour", "budjet", "seqlen", "method"])] = copy.deepcopy(value)
    return doc


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(example=st.sampled_from(EXAMPLES), seed=st.integers(0, 10**6), value=VALUES, n=st.integers(1, 3))
def test_mutated_recipes_load_or_fail_with_a_recipe_error(tmp_path_factory, example, seed, value, n) -> None:
    doc = _mutate(yaml.safe_load(example.read_text()), random.Random(seed), value, n)
    path = tmp_path_factory.mktemp("fuzz") / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_recipe(path)
    except RecipeError as e:
        assert str(path) in str(e)  # every error names the file


@pytest.fixture(scope="module")
def tiny_env(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzzrun")
    save_tiny(str(tmp / "model"), "llama")
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer"]
    (tmp / "calib.txt").write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return tmp


def _tiny_base(tmp: Path, example: Path) -> dict:
    doc = yaml.safe_load(example.read_text())
    if "extends" in doc:  # built on another example: its copy elsewhere cannot reach the base, so resolve it
        doc = resolved_dict(load_recipe(example))
    if doc.get("heal"):  # a tiny model heals on a few sequences (the example's budget is a real model's)
        doc["heal"].update(tokens=8 * 16, seqlen=16, batch=8, micro_batch=4)
    doc["model"] = {"id": str(tmp / "model"), "dtype": "float32", "device": "cpu"}
    doc["calibration"] = {
        "dataset": str(tmp / "calib.txt"),
        "n_samples": 2,
        "seqlen": 16,
        "heldout_windows": 1,
        "heldout_seqlen": 16,
    }
    doc["evaluate"] = {"enabled": False}
    doc.get("budget", {}).pop("multiple_of", None)
    doc["budget"]["multiple_of"] = 4
    for p in doc.get("passes", []) or []:
        p.get("importance", {}).pop("bonsai", None)
    doc.pop("output", None)
    return doc


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    example=st.sampled_from([e for e in EXAMPLES if "search" not in e.name and "sprint" not in e.name]),
    seed=st.integers(0, 10**6),
    value=VALUES,
)
def test_mutated_prune_runs_never_traceback_or_write_outside(
    tiny_env, monkeypatch, example, seed, value
) -> None:
    doc = _mutate(_tiny_base(tiny_env, example), random.Random(seed), value, 1)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=tiny_env))
    recipe = run / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    before = {p for p in tiny_env.rglob("*")}
    loads: list[str] = []
    real = api.load_model

    def counting(*a, **k):
        loads.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(api, "load_model", counting)
    valid = True
    try:
        load_recipe(recipe)
    except RecipeError:
        valid = False
    code = main(["prune", str(recipe), "-o", str(run / "out"), "--quiet"])  # no exception may escape
    assert code in (0, 2)
    if not valid:
        assert code == 2 and loads == []
    new = {p for p in tiny_env.rglob("*")} - before
    outside = [p for p in new if p != run / "out" and run / "out" not in p.parents]
    assert outside == []
