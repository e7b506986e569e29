"""The search's errors (a leaf: every search module may raise them)."""

from __future__ import annotations


class SearchError(RuntimeError):
    """A search that cannot start or continue (storage, mismatched study, no result)."""


class SearchStorageError(SearchError):
    """The storage URL cannot be opened."""


class StudyMismatchError(SearchError):
    """The stored study was created for another search space, model or data."""
