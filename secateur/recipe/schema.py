"""The recipe language, version 1: what may be pruned, under which constraints, to which budget.

Every section is a strict pydantic model that rejects unknown keys, so a typo is an error and
never a silently ignored setting. Values are checked here without a model; checks that need
the model (layer counts, widths) belong to the compiler. Rules that span several sections
live in one table, `STAGE_RULES` (recipe/rules.py, read from each method's spec), plus the few
recipe-wide checks in `Recipe._cross_checks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from secateur.graph.plan import Scoring
from secateur.recipe.allocation import Allocation
from secateur.recipe.budget import Budget, ServeTarget
from secateur.recipe.errors import FieldProblems, KeyPath
from secateur.recipe.fields import Fraction, KeepFraction, NonNegativeInt, PositiveInt, Section, Seed
from secateur.recipe.heal import Heal
from secateur.recipe.methods import (
    DEFAULT_METHOD,
    METHODS,
    METRICS,
    PASS_METHODS,
    RESTORES,
    MethodSpec,
    method_spec,
)
from secateur.recipe.rules import STAGE_RULES, rule_fields
from secateur.recipe.selectors import (
    LayerSelector,
)

SCHEMA_VERSION = 1

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionUnit = Literal["none", "kv_group", "q_head", "v_channel"]
Metric = Literal[METRICS]
RestoreMethod = Literal[RESTORES]
PassMethod = Literal[PASS_METHODS]  # recipe/methods.py declares every method once
Method = Literal[METHODS]


# ---- sections -----------------------------------------------------------------------------------


class ModelSpec(Section):
    """The model to prune: short name, local folder, .gguf file or hub id. `model: NAME` is shorthand."""

    id: str = Field("smollm2-135m", min_length=1)
    dtype: Dtype = "auto"
    device: str = "auto"
    # read the weights one decoder layer at a time from the source and write the output shard by
    # shard (models larger than memory); methods and options that need the whole model refuse
    stream: bool = False

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value


class Calibration(Section):
    """Calibration data: HF name, local text/jsonl (relative to the recipe) or a shared data file."""

    dataset: str = Field("wikitext2", min_length=1)
    split: str = "validation"
    n_samples: PositiveInt = 128
    seqlen: PositiveInt = 512
    seed: Seed = 0
    data_root: str | None = None
    # held-out windows (from the last 10% of the calibration text, never used for statistics)
    # on which BlockPruner, SPRINT and Bonsai score candidates: fewer windows, faster and noisier
    heldout_windows: PositiveInt = 16
    heldout_seqlen: PositiveInt = 256


class Protect(Section):
    """Layers never pruned: the first/last N and explicit indices."""

    first: NonNegativeInt = 0
    last: NonNegativeInt = 0
    layers: list[NonNegativeInt] = Field(default_factory=list)


class Targets(Section):
    """Which structures may be pruned, in which layers."""

    mlp: bool = True
    attention: AttentionUnit = "none"
    sublayers: bool = False
    blocks: bool = False
    layers: list[LayerSelector] = Field(default_factory=lambda: ["all"], min_length=1)
    protect: Protect = Field(default_factory=Protect)

    @field_validator("layers", mode="before")
    @classmethod
    def _one_selector(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, int)) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _something(self) -> Targets:
        if not (self.mlp or self.attention != "none" or self.sublayers or self.blocks):
            raise FieldProblems(
                [((), "nothing to prune: mlp is false, attention is 'none', sublayers and blocks are false")]
            )
        return self


class BonsaiOptions(Section):
    """Perturbative regression (Bonsai): sub-models sampled, units dropped per sample, rounds."""

    samples: PositiveInt = 64
    drop_fraction: Fraction = 0.05
    steps: PositiveInt = 4
    ridge: Annotated[float, Field(ge=0)] = 1.0
    loss: Literal["nll", "kl"] = "nll"  # sub-model loss: next-token NLL (paper) or KL to the dense model


class Importance(Section):
    """How units are scored."""

    metric: Metric = Scoring.metric  # type: ignore[assignment]
    # score: keep the best units by `metric`; obs: remove greedily the units whose loss the consumer's
    # least squares absorbs best (structured Optimal Brain Surgeon, SlimGPT / ZipLM)
    selection: Literal["score", "obs"] = Scoring.selection  # type: ignore[assignment]
    bonsai: BonsaiOptions = Field(default_factory=BonsaiOptions)

    @model_validator(mode="after")
    def _bonsai_options_used(self) -> Importance:
        if self.metric != "bonsai" and self.bonsai != BonsaiOptions():
            raise FieldProblems(
                [(("bonsai",), f"options for metric 'bonsai' have no effect with metric {self.metric!r}")]
            )
        return self


class Restore(Section):
    """How the consuming layer is corrected after pruning; `damping` scales the mean Gram diagonal."""

    method: RestoreMethod = Scoring.restore  # type: ignore[assignment]
    damping: Annotated[float, Field(gt=0)] = Scoring.damping
    # how far each consumer is fitted toward the DENSE model's outputs (a dense stream runs beside the
    # pruned one), so every layer also corrects part of the error the layers before it left: 0 off,
    # 1 the dense target W X_dense, a in between the target W (a X_dense + (1 - a) X)
    error_correction: Annotated[float, Field(ge=0, le=1)] = 0.0
    # sub-block reconstruction: Adam steps on each pruned MLP branch's kept weights toward the dense
    # branch's output, best state on held-out calibration batches kept (0: off)
    refine_steps: NonNegativeInt = 0
    refine_lr: Annotated[float, Field(gt=0, lt=1)] = 1e-4


class Pass(Section):
    """One stage of a multi-stage method; `share` is its part of the budget."""

    name: str = Field(min_length=1)
    targets: Targets
    share: KeepFraction
    importance: Importance = Field(default_factory=Importance)
    restore: Restore = Field(default_factory=Restore)
    method: PassMethod = DEFAULT_METHOD
    heal: Heal | None = None  # distil from the dense model after this pass


class PerplexitySet(Section):
    """A perplexity evaluation: non-overlapping windows of `seqlen` tokens."""

    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: PositiveInt = 2048
    max_windows: PositiveInt | None = None


class LatencyBench(Section):
    """Latency measurement of dense and pruned model, in the same process."""

    prefill_len: PositiveInt = 512
    decode_tokens: PositiveInt = 32
    repeats: PositiveInt = 5
    batch_size: PositiveInt = 1


class Evaluate(Section):
    """What to measure after pruning."""

    perplexity: list[PerplexitySet] = Field(default_factory=lambda: [PerplexitySet()])
    tasks: list[str] = Field(default_factory=list)
    limit: PositiveInt | None = None
    latency: LatencyBench = Field(default_factory=LatencyBench)
    enabled: bool = True


_SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*[KMGT]B\s*$", re.IGNORECASE)


class Export(Section):
    """One inference-engine export written into the output folder beside the safetensors:
    `gguf` (llama.cpp) as model-OUTTYPE.gguf, `decilm` (vLLM's DeciLM / Nemotron-NAS) as decilm/."""

    format: Literal["gguf", "decilm"]
    outtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"] = "f16"
    # gguf: the GGUF to copy tokenizer metadata from (default: the source model when it is a GGUF)
    tokenizer_gguf: str | None = None


class Output(Section):
    """Where the pruned model goes and in which dtype. The runtime never writes outside `dir`.

    `dtype: source` is the dtype of the checkpoint the model came from (config.json's `dtype`; for a
    GGUF file its float type, and bfloat16 for a quantised one). `max_shard_size` splits the weights
    into shards with an index past that size, as `save_pretrained` does (bytes, or "500MB", "5GB")."""

    dir: str | None = None
    format: Literal["safetensors"] = "safetensors"
    dtype: Literal["source", "float32", "bfloat16", "float16"] = "source"
    max_shard_size: str | PositiveInt = "50GB"

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str | int) -> str | int:
        if isinstance(value, str) and not _SHARD_SIZE.match(value):
            raise ValueError(f"a size in bytes or like '500MB' / '5GB' (units KB, MB, GB, TB), got {value!r}")
        return value

    export: list[Export] = Field(default_factory=list)

    @model_validator(mode="after")
    def _exports(self) -> Output:
        problems: list[tuple[KeyPath, str]] = []
        seen: set[tuple[str, str]] = set()
        for i, e in enumerate(self.export):
            if e.format == "decilm" and e.outtype in ("q8_0", "q4_0", "q4_k_m"):
                problems.append(
                    (
                        ("export", i, "outtype"),
                        "decilm weights are f32, f16 or bf16 (q8_0, q4_0, q4_k_m are gguf only)",
                    )
                )
            if (e.format, e.outtype) in seen:
                problems.append((("export", i), f"{e.format} {e.outtype} is listed twice"))
            seen.add((e.format, e.outtype))
        if problems:
            raise FieldProblems(problems)
        return self


# ---- cross-section rules ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """What one pruning stage does: the whole recipe when it has no passes, else each pass."""

    path: KeyPath
    method: str
    targets: Targets
    importance: Importance
    restore: Restore
    heal: Heal | None = None  # healing after this stage (a pass's own, or the recipe's after the last)

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def scoring(self) -> Scoring:
        """The stage's metric, restore, damping and selection as one frozen object."""
        imp, rest = self.importance, self.restore
        return Scoring(imp.metric, rest.method, rest.damping, imp.selection)


def _dotted(path: KeyPath) -> str:
    return "".join(f"{k}." for k in path)


def _version(value: Any) -> Any:
    if value != SCHEMA_VERSION or isinstance(value, bool):
        raise ValueError(
            f"unsupported recipe version {value!r}; this Secateur reads version {SCHEMA_VERSION}"
        )
    return value


class Recipe(Section):
    """A pruning recipe, version 1. Only `budget` is required."""

    version: Annotated[Literal[1], BeforeValidator(_version)] = 1
    name: str | None = None
    extends: str | list[str] | None = Field(
        None, description="Base recipes, deep-merged first; resolved by the loader and never kept."
    )
    model: ModelSpec = Field(default_factory=ModelSpec)
    calibration: Calibration = Field(default_factory=Calibration)
    targets: Targets = Field(default_factory=Targets)
    budget: Budget
    target: ServeTarget = Field(default_factory=ServeTarget)
    importance: Importance = Field(default_factory=Importance)
    allocation: Allocation = Field(default_factory=Allocation)
    restore: Restore = Field(default_factory=Restore)
    method: Method = DEFAULT_METHOD
    passes: list[Pass] = Field(default_factory=list)
    heal: Heal | None = None  # distil from the dense model after the last stage
    evaluate: Evaluate = Field(default_factory=Evaluate)
    output: Output = Field(default_factory=Output)

    def stages(self) -> list[Stage]:
        """The stages to run: each pass, or the recipe itself when it has none."""
        if self.passes:
            last = len(self.passes) - 1
            return [
                Stage(
                    ("passes", i),
                    p.method,
                    p.targets,
                    p.importance,
                    p.restore,
                    heal=p.heal if i < last or self.heal is None else self.heal,
                )
                for i, p in enumerate(self.passes)
            ]
        return [Stage((), self.method, self.targets, self.importance, self.restore, heal=self.heal)]

    @model_validator(mode="after")
    def _cross_checks(self) -> Recipe:
        problems = list(self._problems())
        if problems:
            raise FieldProblems(problems)
        return self

    def _problems(self) -> Iterator[tuple[KeyPath, str]]:
        if self.model.stream and (self.heal or any(p.heal for p in self.passes)):
            yield (
                ("heal",) if self.heal else ("passes",),
                "healing trains the whole pruned model in memory; it cannot run with model.stream: true",
            )
        if self.passes and self.heal and self.passes[-1].heal:
            yield (
                ("passes", len(self.passes) - 1, "heal"),
                "the last pass and the recipe both set heal; keep one (the recipe's heals after the last pass)",
            )
        if self.passes:
            shares = [p.share for p in self.passes]
            if abs(sum(shares) - 1.0) > 1e-6:
                listed = " + ".join(f"{s:g}" for s in shares)
                yield (("passes",), f"pass shares must sum to 1, got {listed} = {sum(shares):g}")
            seen: set[str] = set()
            for i, p in enumerate(self.passes):
                if p.name in seen:
                    yield (("passes", i, "name"), f"duplicate pass name {p.name!r}")
                seen.add(p.name)
        elif self.method == "multipruner":
            yield (("method",), "method 'multipruner' is multi-stage: list its stages under passes")
        for i, e in enumerate(self.output.export):
            for stage in self.stages():
                if stage.targets.attention == "v_channel":
                    yield (
                        ("output", "export", i, "format"),
                        f"{e.format} export cannot hold value-channel pruning ({_dotted(stage.path)}targets.attention "
                        "is 'v_channel'): it leaves value heads narrower than query heads, which llama.cpp and vLLM "
                        "cannot run; prune attention by kv_group or q_head",
                    )
                    break
        if self.allocation.compile == "stitched" and (self.passes or self.method != "fasp"):
            yield (
                ("allocation", "compile"),
                "'stitched' compiles one fasp stage from stored variants; "
                f"method {self.method!r}{' with passes' if self.passes else ''} needs 'sequential'",
            )
        for stage in self.stages():
            fields = rule_fields(stage)
            for rule in STAGE_RULES:
                if rule.broken(stage):
                    yield (stage.path + rule.key, rule.message.format(**fields))
        for key, entry in (self.allocation.table or {}).items():
            values = [entry] if isinstance(entry, float | int) else [entry.mlp, entry.attention]
            for keep in (v for v in values if v):  # 0 removes the branch, whatever min_keep says
                if not (self.budget.min_keep <= keep <= self.budget.max_keep):
                    yield (
                        ("allocation", "table", key),
                        f"keep fraction {keep} is outside budget.min_keep..max_keep "
                        f"({self.budget.min_keep}..{self.budget.max_keep})",
                    )
