"""Errors that name what is wrong: the source, the row and the field."""
from __future__ import annotations


class LdpipeError(Exception):
    """Base class for user-facing errors (the CLI prints them without a traceback)."""


class DataValidationError(LdpipeError):
    def __init__(self, source: str, message: str, *, row: int | str | None = None, field: str | None = None):
        self.source, self.row, self.field = source, row, field
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class SpecError(LdpipeError):
    """A malformed experiment declaration (assets/*.yaml)."""
