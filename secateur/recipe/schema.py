"""The recipe language, version 1: what may be pruned, under which constraints, to which budget.

Every section is a strict pydantic model that rejects unknown keys, so a typo is an error and
never a silently ignored setting. Values are checked here without a model; checks that need
the model (layer counts, widths) belong to the compiler. Rules that span several sections
live in one table, `STAGE_RULES` (recipe/rules.py, read from each method's spec), plus the few
recipe-wide checks in `Recipe._cross_checks`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from secateur.graph.plan import Scoring
from secateur.recipe.errors import FieldProblems, KeyPath
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

SCHEMA_VERSION = 1

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
AttentionUnit = Literal["none", "kv_group", "q_head", "v_channel"]
Metric = Literal[METRICS]
AllocationMethod = Literal["uniform", "table", "proportional", "global", "search"]
RestoreMethod = Literal[RESTORES]
PassMethod = Literal[PASS_METHODS]  # recipe/methods.py declares every method once
Method = Literal[METHODS]

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # open interval (0, 1): a share to remove
KeepFraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]: a share to keep
TableKeep = Annotated[float, Field(ge=0, le=1)]  # [0, 1]: a table's share to keep; 0 removes the branch


class _Section(BaseModel):
    # strict: YAML already gives native types, so "128" or 1.0 for an int is a mistake to report
    model_config = ConfigDict(extra="forbid", strict=True)


# ---- layer selectors and table keys ------------------------------------------------------------

_INDEX_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_NUMBER_RANGE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:-\s*(\d+(?:\.\d*)?)\s*)?$")
LAYER_SELECTOR_FORMS = "an index (3), an inclusive range ('3-7'), 'all' or 're:<regex>'"


def _check_layer_selector(value: Any) -> str | int:
    """Validate one `targets.layers` entry; the value is kept as written."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a layer selector is {LAYER_SELECTOR_FORMS}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"layer index must be >= 0, got {value}")
        return value
    if value == "all" or value.strip().isdigit():
        return value
    if value.startswith("re:"):
        pattern = value[3:]
        if not pattern:
            raise ValueError("empty regex after 're:'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regex {pattern!r}: {e}") from None
        return value
    m = _INDEX_RANGE.match(value)
    if m is None:
        raise ValueError(f"a layer selector is {LAYER_SELECTOR_FORMS}, got {value!r}")
    lo, hi = int(m[1]), int(m[2])
    if lo > hi:
        raise ValueError(f"empty layer range {value!r}: {lo} > {hi} (ranges are 'lo-hi', inclusive)")
    return value


LayerSelector = Annotated[str | int, BeforeValidator(_check_layer_selector)]


def select_layers(selectors: Sequence[str | int], num_layers: int, prefix: str = "model.layers") -> list[int]:
    """Layer indices chosen by `targets.layers`, sorted; regexes must match a whole name `{prefix}.{i}`."""
    chosen: set[int] = set()
    for sel in selectors:
        if isinstance(sel, str) and sel.startswith("re:"):
            rx = re.compile(sel[3:])
            chosen.update(i for i in range(num_layers) if rx.fullmatch(f"{prefix}.{i}"))
            continue
        if sel == "all":
            chosen.update(range(num_layers))
            continue
        if isinstance(sel, int) or sel.strip().isdigit():
            lo = hi = int(sel)
        else:
            m = _INDEX_RANGE.match(sel)
            if m is None:
                raise ValueError(f"not a layer selector: {sel!r}")
            lo, hi = int(m[1]), int(m[2])
        if hi >= num_layers:
            raise ValueError(f"layer selector {sel!r} is out of range for a model with {num_layers} layers")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


class TableKey(NamedTuple):
    """A parsed `allocation.table` key: layer indices or depth fractions, both inclusive."""

    kind: Literal["layers", "depth"]
    lo: float
    hi: float


def parse_table_key(key: str) -> TableKey:
    """'12' and '0-5' are layer indices; '0.5' and '0.25-0.5' (with a dot) are depth fractions in [0, 1]."""
    m = _NUMBER_RANGE.match(key)
    if m is None:
        raise ValueError(
            f"table key {key!r} is not a layer index ('12'), a range ('0-5') or a depth fraction ('0.5', '0.25-0.5')"
        )
    lo_s, hi_s = m[1], m[2] if m[2] is not None else m[1]
    if "." in lo_s or "." in hi_s:
        lo, hi = float(lo_s), float(hi_s)
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ValueError(f"depth fraction {key!r} must lie in [0, 1]")
        kind: Literal["layers", "depth"] = "depth"
    else:
        lo, hi = int(lo_s), int(hi_s)
        kind = "layers"
    if lo > hi:
        raise ValueError(f"empty range {key!r}: {lo_s} > {hi_s}")
    return TableKey(kind, lo, hi)


# ---- sections -----------------------------------------------------------------------------------


class ModelSpec(_Section):
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


class Calibration(_Section):
    """Calibration data: HF name, local text/jsonl (relative to the recipe) or a shared data file."""

    dataset: str = Field("wikitext2", min_length=1)
    split: str = "validation"
    n_samples: PositiveInt = 128
    seqlen: PositiveInt = 512
    seed: int = 0
    data_root: str | None = None
    # held-out windows (from the last 10% of the calibration text, never used for statistics)
    # on which BlockPruner, SPRINT and Bonsai score candidates: fewer windows, faster and noisier
    heldout_windows: PositiveInt = 16
    heldout_seqlen: PositiveInt = 256


class Protect(_Section):
    """Layers never pruned: the first/last N and explicit indices."""

    first: NonNegativeInt = 0
    last: NonNegativeInt = 0
    layers: list[NonNegativeInt] = Field(default_factory=list)


class Targets(_Section):
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


def _params_budget(value: Any) -> Any:
    """`budget.params`: a float in (0, 1) is a fraction, an int >= 1 an absolute count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads exponent forms like 5e6 as text; write 5000000 or 0.2)"
            except ValueError:
                pass
        raise ValueError(f"expected a fraction in (0, 1) or a parameter count >= 1, got {value!r}{hint}")
    if isinstance(value, float):
        if not (0.0 < value < 1.0) or math.isnan(value):
            raise ValueError(
                f"a float is the fraction of decoder linear parameters to remove and must be in (0, 1), "
                f"got {value}; write an integer for an absolute count"
            )
        return value
    if value < 1:
        raise ValueError(f"an absolute parameter count must be >= 1, got {value}")
    return value


BUDGET_KINDS = ("params", "flops", "latency", "throughput")
SPEED_BUDGETS = ("latency", "throughput")


class ServeTarget(_Section):
    """Where the pruned model is served: the engine whose fast widths `budget.multiple_of: auto`
    follows, whose measured per-layer latency a latency budget is compiled with, and in which the
    report measures speed."""

    engine: Literal["llama.cpp", "torch", "vllm"] = "llama.cpp"
    device: Literal["cpu", "cuda"] = "cpu"
    # auto: f16 in llama.cpp, float32 on a CPU in PyTorch, bfloat16 on CUDA
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    quant: Literal["q8_0", "q4_0", "q4_k_m"] | None = None  # GGUF quantisation (llama.cpp only)
    threads: PositiveInt | None = None  # CPU threads; default: the cores this process may use

    @model_validator(mode="after")
    def _engine_fits(self) -> ServeTarget:
        problems: list[tuple[KeyPath, str]] = []
        if self.quant and self.engine != "llama.cpp":
            problems.append(
                (("quant",), f"target.quant is a GGUF type; engine {self.engine} does not read GGUF")
            )
        if self.engine == "vllm" and self.device != "cuda":
            problems.append((("device",), "target.engine vllm runs on CUDA: set target.device: cuda"))
        if problems:
            raise FieldProblems(problems)
        return self


class Budget(_Section):
    """The goal (exactly one of params, flops, latency, throughput) and per-layer limits."""

    params: Annotated[float | int | None, BeforeValidator(_params_budget)] = None
    flops: Fraction | None = None
    # time per request on `target`, as a fraction of dense (0.7: 30% less time), from the latency model
    latency: Fraction | None = None
    # tokens/s on `target` as a multiple of dense (1.4: 40% more); the same goal as latency 1/1.4
    throughput: Annotated[float, Field(gt=1)] | None = None
    # which phase a latency/throughput goal is measured on; both: each phase must meet it
    phase: Literal["prefill", "decode", "both"] = "both"
    min_keep: KeepFraction = 0.05
    max_keep: KeepFraction = 1.0
    # auto: the MLP width step the serving target runs fast (a measured sweep on `target`, cached;
    # never finer than the GGUF quant block); a number: that step
    multiple_of: PositiveInt | Literal["auto"] = "auto"
    # positions each token attends to when budget.flops counts the QK^T and AV products
    context: PositiveInt = 512

    @model_validator(mode="after")
    def _one_goal(self) -> Budget:
        problems: list[tuple[KeyPath, str]] = []
        kinds = [k for k in BUDGET_KINDS if getattr(self, k) is not None]
        if not kinds:
            problems.append(((), "set exactly one of budget.params, budget.flops, budget.latency"))
        elif len(kinds) > 1:
            problems.append(((), f"set exactly one budget kind, got {' and '.join(kinds)}"))
        if self.min_keep > self.max_keep:
            problems.append(
                (("min_keep",), f"min_keep ({self.min_keep}) must not exceed max_keep ({self.max_keep})")
            )
        if self.phase != "both" and not any(getattr(self, k) is not None for k in SPEED_BUDGETS):
            problems.append((("phase",), "budget.phase applies to budget.latency or budget.throughput only"))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def latency_goal(self) -> float | None:
        """A speed goal as a fraction of dense time (throughput t is latency 1/t)."""
        if self.latency is not None:
            return float(self.latency)
        return 1.0 / float(self.throughput) if self.throughput is not None else None

    @property
    def kind(self) -> Literal["params", "flops", "latency", "throughput"]:
        """Which goal is set."""
        return next(k for k in BUDGET_KINDS if getattr(self, k) is not None)  # type: ignore[return-value]


class BonsaiOptions(_Section):
    """Perturbative regression (Bonsai): sub-models sampled, units dropped per sample, rounds."""

    samples: PositiveInt = 64
    drop_fraction: Fraction = 0.05
    steps: PositiveInt = 4
    ridge: Annotated[float, Field(ge=0)] = 1.0
    loss: Literal["nll", "kl"] = "nll"  # sub-model loss: next-token NLL (paper) or KL to the dense model


class Importance(_Section):
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


class SearchOptions(_Section):
    """Optuna allocation search; `storage` is a SQLite path or any Optuna RDB URL."""

    trials: PositiveInt = 100
    objective: Literal["kl", "ppl"] = "kl"
    storage: str | None = None
    heldout_tokens: PositiveInt = 16384
    seed: int = 0
    # default: evolution wherever it applies (a level space), measured best in bench/results/search.md;
    # TPE otherwise (evolution moves keep levels and has none to move without `levels`)
    sampler: Literal["evolution", "nsga2", "tpe", "cmaes", "random"] | None = None
    # Pareto mode: [kl or ppl, latency or params] gives a front (quality against predicted time on the
    # recipe's target, or against the parameters kept) through a multi-objective study (TPE by default)
    objectives: list[Literal["kl", "ppl", "latency", "params"]] | None = None
    pruner: bool = True
    # 0: one keep fraction per layer and structure; N >= 2: N knots over depth, interpolated
    knots: NonNegativeInt = 0
    # 0: any kept count; K >= 2: K keep levels per structure, evenly spaced from whole down to the
    # branch removed (MLP, KV groups; query heads stop at one per group), plus the few off-level
    # counts that meet the budget exactly; candidates are stitched from the variant database
    levels: NonNegativeInt = 0
    # multi-fidelity: held-out tokens scored before each pruning decision (ascending; the last stage
    # is always all `heldout_tokens`); empty: a quarter of them, then the rest
    stages: list[PositiveInt] = Field(default_factory=list)
    # share of the recent trials that reach a stage and go on past it (search/pruner.py)
    survivors: Annotated[float, Field(gt=0, le=1)] = 0.5
    # with allocation.compile: sequential, the best `rescore` candidates (plus the uniform and CFSP
    # seeds) are compiled sequentially and re-scored before the winner is named (search/rescore.py)
    rescore: NonNegativeInt = 3

    @model_validator(mode="after")
    def _levels_and_stages(self) -> SearchOptions:
        if self.sampler is None:
            if self.objectives:  # measured: bench/results/pareto-samplers.md
                self.sampler = "tpe"
            else:
                self.sampler = "evolution" if self.levels >= 2 and not self.knots else "tpe"
        problems: list[tuple[KeyPath, str]] = []
        if self.objectives is not None:
            o = self.objectives
            if len(o) != 2 or o[0] not in ("kl", "ppl") or o[1] not in ("latency", "params"):
                problems.append(
                    (("objectives",), f"objectives: {o} (two: kl or ppl, then latency or params)")
                )
            elif o[0] != self.objective:
                problems.append(
                    (
                        ("objectives",),
                        f"objectives: {o} starts with {o[0]!r}; objective is {self.objective!r}",
                    )
                )
            if self.levels < 2:
                problems.append(
                    (("levels",), "levels: Pareto mode searches keep levels; set levels (e.g. 9)")
                )
            if self.sampler not in ("nsga2", "tpe", "random"):
                problems.append(
                    (
                        ("sampler",),
                        f"sampler: {self.sampler} is single-objective; use tpe (default), nsga2 or random",
                    )
                )
        elif self.sampler == "nsga2":
            problems.append((("sampler",), "sampler: nsga2 is for Pareto mode (objectives: [kl, latency])"))
        if self.levels == 1:
            problems.append((("levels",), "levels: 1 (0 for any count, or >= 2)"))
        if self.sampler == "evolution" and self.levels < 2:
            problems.append((("sampler",), "sampler: evolution moves keep levels; set levels (e.g. 9)"))
        if self.sampler == "evolution" and self.knots:
            problems.append((("knots",), "knots: the evolution sampler searches every layer (knots: 0)"))
        if self.stages != sorted(set(self.stages)):
            problems.append((("stages",), f"stages: {self.stages} must be strictly ascending"))
        elif self.stages and self.stages[-1] > self.heldout_tokens:
            problems.append(
                (("stages",), f"stages: {self.stages[-1]} exceeds heldout_tokens ({self.heldout_tokens})")
            )
        if problems:
            raise FieldProblems(problems)
        return self


class StructureKeep(_Section):
    """Per-structure keep fractions of one table entry (what `secateur search` writes)."""

    mlp: TableKeep | None = None
    attention: TableKeep | None = None


class Allocation(_Section):
    """How the budget is spread over layers."""

    method: AllocationMethod = "uniform"
    table: dict[str, TableKeep | StructureKeep] | None = None
    search: SearchOptions = Field(default_factory=SearchOptions)
    # sequential: layer by layer on the pruned model's own statistics; stitched: every structure
    # pruned one-shot from the dense model's statistics (the variant database a search scores)
    compile: Literal["sequential", "stitched"] = "sequential"
    # where the variant database lives (default $SECATEUR_VARIANTS or ~/.cache/secateur/variants)
    variants_dir: str | None = None

    @field_validator("table", mode="before")
    @classmethod
    def _keys_as_text(cls, value: Any) -> Any:
        # YAML reads `12:` as an int and `0.5:` as a float; both are valid table keys
        if isinstance(value, dict):
            return {k if isinstance(k, str) or isinstance(k, bool) else str(k): v for k, v in value.items()}
        return value

    @field_validator("table")
    @classmethod
    def _table_keys(
        cls, table: dict[str, float | StructureKeep] | None
    ) -> dict[str, float | StructureKeep] | None:
        if table is None:
            return None
        problems: list[tuple[KeyPath, str]] = []
        if not table:
            problems.append(((), "the table is empty"))
        spans: list[tuple[int, int, str]] = []
        for key in table:
            try:
                tk = parse_table_key(key)
            except ValueError as e:
                problems.append(((key,), str(e)))
                continue
            if tk.kind == "layers":
                for lo, hi, other in spans:
                    if tk.lo <= hi and lo <= tk.hi:
                        problems.append(((key,), f"overlaps table key {other!r}"))
                spans.append((int(tk.lo), int(tk.hi), key))
        if problems:
            raise FieldProblems(problems)
        return table

    @model_validator(mode="after")
    def _method_options(self) -> Allocation:
        problems: list[tuple[KeyPath, str]] = []
        if self.method == "table" and self.table is None:
            problems.append(
                (("table",), "allocation method 'table' needs allocation.table (layer -> keep fraction)")
            )
        if self.method != "table" and self.table is not None:
            problems.append((("table",), f"a table is only used by method 'table', not {self.method!r}"))
        if self.method != "search" and self.search != SearchOptions():
            problems.append((("search",), f"search options have no effect with method {self.method!r}"))
        if problems:
            raise FieldProblems(problems)
        return self


class Restore(_Section):
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


class Pass(_Section):
    """One stage of a multi-stage method; `share` is its part of the budget."""

    name: str = Field(min_length=1)
    targets: Targets
    share: KeepFraction
    importance: Importance = Field(default_factory=Importance)
    restore: Restore = Field(default_factory=Restore)
    method: PassMethod = DEFAULT_METHOD
    heal: Heal | None = None  # distil from the dense model after this pass


class PerplexitySet(_Section):
    """A perplexity evaluation: non-overlapping windows of `seqlen` tokens."""

    dataset: str = "wikitext2"
    split: str = "test"
    seqlen: PositiveInt = 2048
    max_windows: PositiveInt | None = None


class LatencyBench(_Section):
    """Latency measurement of dense and pruned model, in the same process."""

    prefill_len: PositiveInt = 512
    decode_tokens: PositiveInt = 32
    repeats: PositiveInt = 5
    batch_size: PositiveInt = 1


class Evaluate(_Section):
    """What to measure after pruning."""

    perplexity: list[PerplexitySet] = Field(default_factory=lambda: [PerplexitySet()])
    tasks: list[str] = Field(default_factory=list)
    limit: PositiveInt | None = None
    latency: LatencyBench = Field(default_factory=LatencyBench)
    enabled: bool = True


_SHARD_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*[KMGT]B\s*$", re.IGNORECASE)


class Export(_Section):
    """One inference-engine export written into the output folder beside the safetensors:
    `gguf` (llama.cpp) as model-OUTTYPE.gguf, `decilm` (vLLM's DeciLM / Nemotron-NAS) as decilm/."""

    format: Literal["gguf", "decilm"]
    outtype: Literal["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"] = "f16"
    # gguf: the GGUF to copy tokenizer metadata from (default: the source model when it is a GGUF)
    tokenizer_gguf: str | None = None


class Output(_Section):
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


class Recipe(_Section):
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
