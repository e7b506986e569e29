"""One declaration per pruning method: what it removes, what it accepts, whether it streams.

Data only, so the schema (its `method:` literals and stage rules), `recipe explain`, the
preflight checks and the method registry all read the same facts. Adding a method is its module
under `runtime/methods/` (which registers its run against the spec of the same name), one
`MethodSpec` below, and its test (docs/ADD_A_METHOD.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# every importance metric and restore method the schema knows (its `Metric` and `RestoreMethod`)
METRICS = ("fasp", "magnitude", "wanda", "fluctuation", "activation_norm", "angular", "bonsai", "ppl_delta")
RESTORES = ("least_squares", "bias_compensation", "none")
DEFAULT_METHOD = "fasp"  # a recipe's `method:` (and a pass's) when it names none
# metrics that bring their own restore: any method may use `restore: bias_compensation` with them
BIAS_COMPENSATION_METRICS = frozenset({"fluctuation"})
# multi-stage methods: a recipe of passes, each naming a method below (no module of their own)
COMPOSITE_METHODS = ("multipruner",)

_COMMON_METRICS = frozenset(METRICS) - {"bonsai"}  # `bonsai` scores sub-models: bonsai's alone
_PLAIN_RESTORES = frozenset({"least_squares", "none"})


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, as data.

    kind: `width` removes channels and heads; `sublayer` removes whole residual branches or
    blocks (its stages need targets.sublayers or targets.blocks).
    sequential: it runs the layer-wise selection and restoration pass, so importance.selection
    'obs', restore.error_correction and restore.refine_steps apply to it.
    planned: `recipe explain` can plan its widths from shapes alone under a uniform or table
    allocation (the others choose their units from calibration data at prune time).
    streams: it runs with model.stream (layers read one at a time; an allocation that compares layers
    first streams the dense layers once to measure them); else `whole_model` says why not.
    """

    name: str
    kind: Literal["width", "sublayer"]
    summary: str
    sequential: bool = False
    planned: bool = False
    streams: bool = False
    whole_model: str = ""
    metrics: frozenset[str] = _COMMON_METRICS
    restores: frozenset[str] = _PLAIN_RESTORES


METHOD_SPECS: tuple[MethodSpec, ...] = (
    MethodSpec(
        "fasp",
        "width",
        "FASP: coupled column/row pruning, Wanda-like column scores, least-squares restoration",
        sequential=True,
        planned=True,
        streams=True,
    ),
    MethodSpec(
        "blockpruner",
        "sublayer",
        "BlockPruner: greedy removal of the attention / MLP sublayer that hurts held-out quality least",
        whole_model="its candidate scoring runs the whole model once per candidate block",
    ),
    MethodSpec(
        "sprint",
        "sublayer",
        "SPRINT: greedy removal by quality lost per latency saved, least-squares restoration after each step",
        whole_model="its candidate scoring runs the whole model once per candidate block",
    ),
    MethodSpec(
        "cfsp",
        "width",
        "CFSP: coarse angular block importance sets each block's share; fine activation scores pick units",
        sequential=True,
        streams=True,
    ),
    MethodSpec(
        "bonsai",
        "width",
        "Bonsai: unit importance from perturbed sub-models' losses, forward passes only",
        planned=True,
        whole_model="it scores perturbed sub-models by running the whole model many times",
        metrics=frozenset(METRICS),
    ),
    MethodSpec(
        "flap",
        "width",
        "FLAP: fluctuation metric, per-layer standardised scores ranked globally, bias compensation",
        sequential=True,
        streams=True,
        restores=frozenset(RESTORES),
    ),
)

SPECS: dict[str, MethodSpec] = {s.name: s for s in METHOD_SPECS}
PASS_METHODS: tuple[str, ...] = tuple(SPECS)  # what a stage (a recipe or one pass) may name
# what a recipe's `method:` may name, in the order the schema lists them
METHODS: tuple[str, ...] = (*PASS_METHODS[:3], *COMPOSITE_METHODS, *PASS_METHODS[3:])


def method_spec(name: str) -> MethodSpec:
    """The spec of a stage's method; a composite one (multipruner) has a neutral spec, its passes
    carry the rules (KeyError: not a method)."""
    if name in COMPOSITE_METHODS:
        return MethodSpec(name, "width", "a recipe of passes, each naming a method")
    return SPECS[name]


def names_with(flag: str) -> list[str]:
    """Methods whose spec has `flag` true, in declaration order (for messages)."""
    return [s.name for s in METHOD_SPECS if getattr(s, flag)]


def spoken(names: list[str], conj: str = "and") -> str:
    """'a', 'a and b', 'a, b and c' (method lists in messages)."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conj} {names[-1]}"
