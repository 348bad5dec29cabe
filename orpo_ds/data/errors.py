"""The one error type of the data pipeline (every module of :mod:`orpo_ds.data` raises it)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Unusable data: a bad source or format (dataset level), or, with ``strict=True``, a bad row.

    ``row`` and ``reason`` are set for row-level errors.
    """

    def __init__(self, message: str, *, row: int | None = None, reason: str | None = None):
        super().__init__(message)
        self.row = row
        self.reason = reason
