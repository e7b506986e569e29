"""The recipe's `budget:` (one goal and per-layer limits) and `target:` (where the model is served)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from secateur.recipe.errors import FieldProblems, KeyPath
from secateur.recipe.fields import Fraction, KeepFraction, PositiveInt, Section


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


class ServeTarget(Section):
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


class Budget(Section):
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
