"""The rules that tie one stage's options to its method, each read from the method's spec
(recipe/methods.py), never from a list of method names. `Recipe._cross_checks` reports every
broken rule at its key; the messages name the methods the specs allow."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from secateur.recipe.errors import KeyPath
from secateur.recipe.methods import BIAS_COMPENSATION_METRICS, METHOD_SPECS, names_with, spoken

if TYPE_CHECKING:
    from secateur.recipe.schema import Stage


@dataclass(frozen=True)
class StageRule:
    """A constraint on one stage: `broken(stage)` true means `message` is reported at `key`."""

    key: KeyPath
    broken: Callable[[Stage], bool]
    message: str


def _restores(s: Stage) -> frozenset[str]:
    """The restore methods a stage may use: its method's, plus bias compensation with the metrics
    that bring it."""
    extra = {"bias_compensation"} if s.importance.metric in BIAS_COMPENSATION_METRICS else set()
    return s.spec.restores | extra


_SEQUENTIAL = spoken(names_with("sequential"))
_BIAS_METHODS = " or ".join(repr(s.name) for s in METHOD_SPECS if "bias_compensation" in s.restores)
_BIAS_METRICS = " or ".join(repr(m) for m in sorted(BIAS_COMPENSATION_METRICS))

# every rule reads the stage's MethodSpec (recipe/methods.py), never a list of method names
STAGE_RULES: tuple[StageRule, ...] = (
    StageRule(
        ("method",),
        lambda s: s.spec.kind == "sublayer" and not (s.targets.sublayers or s.targets.blocks),
        "method {method!r} removes whole sublayers or blocks, but targets.sublayers and targets.blocks "
        "are both false; set one of them to true",
    ),
    StageRule(
        ("restore", "method"),
        lambda s: s.restore.method not in _restores(s),
        f"restore {{restore!r}} needs method {_BIAS_METHODS} or importance.metric {_BIAS_METRICS} "
        "(got method {method!r}, metric {metric!r})",
    ),
    StageRule(
        ("importance", "metric"),
        lambda s: s.importance.metric not in s.spec.metrics,
        "importance.metric {metric!r} only works with {metric_methods} (got method {method!r})",
    ),
    StageRule(
        ("importance", "selection"),
        lambda s: s.importance.selection != "score" and not s.spec.sequential,
        f"importance.selection 'obs' works with methods {_SEQUENTIAL} (got method {{method!r}})",
    ),
    StageRule(
        ("restore", "error_correction"),
        lambda s: (
            s.restore.error_correction and (not s.spec.sequential or s.restore.method != "least_squares")
        ),
        "restore.error_correction needs restore.method 'least_squares' and method "
        f"{spoken(names_with('sequential'), 'or')} (got method {{method!r}})",
    ),
    StageRule(
        ("restore", "refine_steps"),
        lambda s: s.restore.refine_steps > 0 and (not s.spec.sequential or not s.targets.mlp),
        "restore.refine_steps refines pruned MLP branches: it needs targets.mlp and method "
        f"{spoken(names_with('sequential'), 'or')} (got method {{method!r}})",
    ),
)


def _metric_methods(metric: str) -> str:
    """'method 'x'' or 'methods 'x', 'y'': the methods that accept `metric` (for messages)."""
    names = [repr(s.name) for s in METHOD_SPECS if metric in s.metrics]
    return f"method {names[0]}" if len(names) == 1 else f"methods {', '.join(names)}"


def rule_fields(stage: Stage) -> dict[str, Any]:
    """What a rule's message may name: method, metric, restore, the methods that take the metric."""
    return {
        "method": stage.method,
        "metric": stage.importance.metric,
        "restore": stage.restore.method,
        "metric_methods": _metric_methods(stage.importance.metric),
    }
