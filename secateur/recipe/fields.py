"""The base of every recipe section and the number types sections share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

PositiveInt = Annotated[int, Field(gt=0)]
# what torch's and numpy's (Optuna's) generators take: a seed of 2**70 overflowed mid-run
Seed = Annotated[int, Field(ge=0, lt=2**32)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # open interval (0, 1): a share to remove
KeepFraction = Annotated[float, Field(gt=0, le=1)]  # (0, 1]: a share to keep
TableKeep = Annotated[float, Field(ge=0, le=1)]  # [0, 1]: a table's share to keep; 0 removes the branch


class Section(BaseModel):
    """A recipe section: unknown keys are errors, and values keep their YAML types."""

    # strict: YAML already gives native types, so "128" or 1.0 for an int is a mistake to report
    model_config = ConfigDict(extra="forbid", strict=True)
