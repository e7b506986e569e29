"""The recipe's `allocation:`: how the budget is spread over layers, and the search's options."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from secateur.recipe.errors import FieldProblems, KeyPath
from secateur.recipe.fields import NonNegativeInt, PositiveInt, Section, Seed, TableKeep
from secateur.recipe.selectors import parse_table_key

AllocationMethod = Literal["uniform", "table", "proportional", "global", "search"]


class SearchOptions(Section):
    """Optuna allocation search; `storage` is a SQLite path or any Optuna RDB URL."""

    trials: PositiveInt = 100
    objective: Literal["kl", "ppl"] = "kl"
    storage: str | None = None
    heldout_tokens: PositiveInt = 16384
    seed: Seed = 0
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


class StructureKeep(Section):
    """Per-structure keep fractions of one table entry (what `secateur search` writes)."""

    mlp: TableKeep | None = None
    attention: TableKeep | None = None


class Allocation(Section):
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
