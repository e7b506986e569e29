"""One declaration per method: recipe/methods.py's specs are what the schema, the registry,
preflight and `recipe explain` read, and every spec has a module that registers its run."""

from __future__ import annotations

from typing import get_args

import pytest

from secateur.checks import StreamError, check_streamable
from secateur.recipe.errors import RecipeError
from secateur.recipe.load import recipe_from_dict
from secateur.recipe.methods import COMPOSITE_METHODS, METHOD_SPECS, SPECS, method_spec
from secateur.recipe.schema import Method, PassMethod
from secateur.runtime.methods import get_method, method_names, register_method


def test_every_spec_has_a_registered_method_and_every_method_a_spec() -> None:
    assert method_names() == sorted(SPECS)
    for spec in METHOD_SPECS:
        assert get_method(spec.name).spec is spec
        assert get_method(spec.name).streams == spec.streams


def test_the_schema_literals_are_the_specs() -> None:
    assert get_args(PassMethod) == tuple(SPECS)
    assert set(get_args(Method)) == set(SPECS) | set(COMPOSITE_METHODS)


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=lambda s: s.name)
def test_a_spec_says_why_it_cannot_stream(spec) -> None:
    assert bool(spec.whole_model) != spec.streams, spec.name
    assert spec.summary and spec.kind in ("width", "sublayer")


def test_a_run_without_a_spec_cannot_register() -> None:
    with pytest.raises(ValueError, match=r"'nope' has no spec: declare it in recipe/methods.py"):
        register_method("nope")(lambda ctx: None)


def _recipe(**doc):
    return recipe_from_dict({"budget": {"params": 0.2}, **doc}, "r.yaml")


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=lambda s: s.name)
def test_the_schema_rules_follow_each_spec(spec) -> None:
    targets = {"sublayers": True} if spec.kind == "sublayer" else {"mlp": True}
    base = {"method": spec.name, "targets": targets}
    if spec.kind == "sublayer":  # a sublayer method without sublayer targets is refused
        with pytest.raises(RecipeError, match="removes whole sublayers or blocks"):
            _recipe(method=spec.name, targets={"mlp": True})
    obs = {**base, "importance": {"selection": "obs"}}
    if spec.sequential:
        _recipe(**obs)
    else:
        with pytest.raises(
            RecipeError, match="importance.selection 'obs' works with methods fasp, cfsp and flap"
        ):
            _recipe(**obs)
    bias = {**base, "restore": {"method": "bias_compensation"}}
    if "bias_compensation" in spec.restores:
        _recipe(**bias)
    else:
        with pytest.raises(RecipeError, match="restore 'bias_compensation' needs method 'flap'"):
            _recipe(**bias)
    bonsai = {**base, "importance": {"metric": "bonsai"}}
    if "bonsai" in spec.metrics:
        _recipe(**bonsai)
    else:
        with pytest.raises(RecipeError, match="importance.metric 'bonsai' only works with method 'bonsai'"):
            _recipe(**bonsai)


@pytest.mark.parametrize("spec", METHOD_SPECS, ids=lambda s: s.name)
def test_streaming_follows_the_spec(spec) -> None:
    targets = {"sublayers": True} if spec.kind == "sublayer" else {"mlp": True}
    recipe = _recipe(method=spec.name, targets=targets, model={"stream": True})
    if spec.streams:
        check_streamable(recipe)
    else:
        with pytest.raises(StreamError, match=f"method {spec.name!r} cannot stream: {spec.whole_model}"):
            check_streamable(recipe)


def test_a_composite_method_has_a_neutral_spec() -> None:
    assert method_spec("multipruner").kind == "width" and not method_spec("multipruner").sequential
    with pytest.raises(KeyError):
        method_spec("nope")
