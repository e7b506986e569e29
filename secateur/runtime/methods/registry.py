"""The method registry: a recipe's `method:` name -> its data-free check and its run.

Each method module registers itself with `@register_method(name, check=...)` against the spec of
the same name in recipe/methods.py (what the method is and accepts, declared once); the API looks
methods up here instead of branching on names, and a test asserts every spec has a registered
method and every registered method a spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from secateur.recipe.methods import SPECS, MethodSpec
from secateur.runtime.prune.sequential import PruneResult
from secateur.runtime.prune.stage import CheckContext, StageContext

RunFn = Callable[[StageContext], PruneResult]
CheckFn = Callable[[CheckContext], None]


@dataclass(frozen=True)
class Method:
    """A pruning method: `check` raises on a stage it cannot run (shapes only, no data); `run` prunes."""

    name: str
    run: RunFn
    check: CheckFn
    spec: MethodSpec

    @property
    def streams(self) -> bool:
        """Runs with the layers read from disk one at a time (model.stream)."""
        return self.spec.streams

    def __call__(self, ctx: StageContext) -> PruneResult:
        return self.run(ctx)


_METHODS: dict[str, Method] = {}


def _no_check(ctx: CheckContext) -> None:
    return None


def register_method(name: str, check: CheckFn | None = None) -> Callable[[RunFn], RunFn]:
    """Decorator registering `run` under the recipe name `method: NAME`, with its preflight check.
    NAME must have a spec in recipe/methods.py (a spec with `streams` true promises that `run`
    passes `ctx.layer_io` to the sequential pass and needs no whole model)."""

    def wrap(fn: RunFn) -> RunFn:
        if name not in SPECS:
            raise ValueError(f"method {name!r} has no spec: declare it in recipe/methods.py METHOD_SPECS")
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = Method(name, fn, check or _no_check, SPECS[name])
        return fn

    return wrap


def method_names() -> list[str]:
    """Every registered method name, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> Method:
    """The registered method for a recipe's `method`."""
    if name not in _METHODS:
        raise ValueError(f"method {name!r} is not available; available: {', '.join(method_names())}")
    return _METHODS[name]
