"""The `heal:` section: distillation from the dense model after pruning (Minitron, LLM-Pruner).

The pruned student learns the dense teacher's next-token distributions on text that does not
flatter the test: by default text the dense model generates itself, or a local file / a
non-test split of the data root. Teacher distributions are computed once, before pruning, and
kept as their top-k log-probabilities plus the mass of the rest (an exact KL over k+1 buckets),
so the teacher never sits in memory beside the student.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from secateur.recipe.fields import PositiveInt, Section, Seed

SELF_DATA = "self"
TEST_SPLITS = frozenset({"test"})


class HealData(Section):
    """The text healing trains on: `self` (the dense model samples it, no corpus needed), a
    dataset name of the data root with a non-test split, or a .txt/.raw/.jsonl file."""

    dataset: str = Field(SELF_DATA, min_length=1)
    split: str = "validation"
    temperature: Annotated[float, Field(gt=0, le=2)] = 1.0  # sampling temperature of `self` text
    seed: Seed = 0

    @field_validator("split")
    @classmethod
    def _never_test(cls, split: str) -> str:
        if split in TEST_SPLITS:
            raise ValueError(
                "healing never trains on a test split (the evaluation would then flatter the model); "
                "use dataset: self, a training or validation split, or a local text file"
            )
        return split


class LoraOptions(Section):
    """Low-rank adapters through peft, merged into the weights after training (shapes unchanged)."""

    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class Heal(Section):
    """Distillation after pruning: KL(teacher || student) on `tokens` training tokens."""

    tokens: PositiveInt = 65536
    seqlen: PositiveInt = 256
    batch: PositiveInt = 8  # sequences per optimiser step
    micro_batch: PositiveInt = 4  # sequences per forward; batch / micro_batch gradient accumulation steps
    lr: Annotated[float, Field(gt=0, lt=1)] = 1e-4
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.05  # share of the steps
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    train: Literal["all", "pruned", "lora"] = "all"  # which parameters learn
    freeze_embeddings: bool = True  # embeddings and head stay as pruned (they were not pruned)
    lora: LoraOptions = Field(default_factory=LoraOptions)
    top_k: Annotated[int, Field(gt=0, le=4096)] = 64  # teacher log-probs kept per position
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # autocast; auto: bf16 where it runs fast
    gradient_checkpointing: bool = False
    checkpoint_every: PositiveInt = 25  # optimiser steps between checkpoints (resume after a kill)
    seed: Seed = 0
    data: HealData = Field(default_factory=HealData)

    @field_validator("micro_batch")
    @classmethod
    def _divides(cls, micro: int, info) -> int:  # noqa: ANN001 - pydantic's ValidationInfo
        batch = info.data.get("batch")
        if batch is not None and batch % micro:
            raise ValueError(f"micro_batch {micro} must divide batch {batch}")
        return micro

    @property
    def steps(self) -> int:
        """Optimiser steps the token budget buys (at least one)."""
        return max(1, self.tokens // (self.batch * self.seqlen))

    @property
    def sequences(self) -> int:
        """Distinct training sequences: every step sees new text (one epoch)."""
        return self.steps * self.batch
