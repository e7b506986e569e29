"""Recipe problems as data: where (file, line, key path) and what, for people and for tools.

A recipe comes from another team, so every problem must point at the line to fix. The schema
raises `FieldProblems` for checks that span several keys; the loader turns those and
pydantic's own errors into `RecipeIssue`s and raises them together in one `RecipeError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KeyPath = tuple[str | int, ...]


def format_key(path: Sequence[str | int]) -> str:
    """Dotted key path as `--set` spells it (`passes.1.share`); the whole recipe is `(recipe)`."""
    return ".".join(str(p) for p in path) if path else "(recipe)"


@dataclass(frozen=True)
class RecipeIssue:
    """One problem: the file (or `--set ARG`) it comes from, the 1-based line, key path, message."""

    file: str
    line: int | None
    path: KeyPath
    message: str

    @property
    def key(self) -> str:
        return format_key(self.path)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}"


class RecipeError(ValueError):
    """A recipe that cannot be loaded; carries every issue found, one per line in `str()`."""

    def __init__(self, issues: Iterable[RecipeIssue]) -> None:
        self.issues: list[RecipeIssue] = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class FieldProblems(ValueError):
    """Raised inside schema validators: problems at key paths relative to the validated model.

    Pydantic attaches a validator's error to the model as a whole; carrying the exact paths
    lets the loader point each problem at its own key and line.
    """

    def __init__(self, problems: Iterable[tuple[KeyPath, str]]) -> None:
        self.problems: list[tuple[KeyPath, str]] = list(problems)
        super().__init__("; ".join(f"{format_key(p)}: {m}" for p, m in self.problems))
