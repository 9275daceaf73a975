"""Errors of the patient-data layer.

::

    DataError (ValueError)
     ├── SchemaMismatchError   records do not match the data set already stored
     ├── CSVImportError        a CSV file failed validation; ``report`` lists every problem
     ├── SplitError            records cannot be split across hospitals as asked
     └── SourceError           a data source (SQL query, image folder) cannot be used as
          │                    configured; ``issues`` lists every problem
          └── ReadOnlyError    a SQL query could write, or read-only cannot be enforced
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CSVImportError",
    "DataError",
    "ImportIssue",
    "ReadOnlyError",
    "SchemaMismatchError",
    "SourceError",
    "SourceIssue",
    "SplitError",
]


class DataError(ValueError):
    """Base class of every error raised by :mod:`peer.data`."""


class SchemaMismatchError(DataError):
    """Records have a different feature count or names than the stored data set."""


class SplitError(DataError):
    """The records cannot be distributed across hospitals with the requested minimums."""


@dataclass(frozen=True, slots=True)
class ImportIssue:
    """One problem found in a CSV file.

    Attributes:
        line: 1-based line number in the file (the header is line 1), or None if the problem
            concerns a whole column or the file.
        column: the column name concerned, or None.
        message: what is wrong, in words a data manager can act on.
    """

    line: int | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = []
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column!r}")
        prefix = ", ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class CSVImportError(DataError):
    """A CSV file failed validation. Nothing was written to the database.

    Attributes:
        path: the file that was read.
        issues: every problem found (the message shows the first ones).
    """

    MAX_SHOWN = 20

    def __init__(self, path: str, issues: list[ImportIssue]) -> None:
        self.path = path
        self.issues = issues
        shown = "\n  ".join(str(issue) for issue in issues[: self.MAX_SHOWN])
        more = len(issues) - self.MAX_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{path}: {len(issues)} problem(s), nothing was imported:\n  {shown}{tail}"
        )


@dataclass(frozen=True, slots=True)
class SourceIssue:
    """One problem of a data source.

    Attributes:
        subject: what it concerns, e.g. ``"column 'hba1c'"`` or ``"file 'scan_07.dcm'"``, or
            None for the source as a whole.
        message: what is wrong, in words a data manager can act on.
    """

    subject: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}" if self.subject else self.message


class SourceError(DataError):
    """A data source cannot be used as configured; nothing of it was used.

    Attributes:
        source: where the data lives (URL with the password hidden, or a folder).
        issues: every problem found.
    """

    MAX_SHOWN = 20

    def __init__(self, source: str, issues: list[SourceIssue]) -> None:
        self.source = source
        self.issues = issues
        shown = "\n  ".join(str(issue) for issue in issues[: self.MAX_SHOWN])
        more = len(issues) - self.MAX_SHOWN
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source}: {len(issues)} problem(s), nothing was used:\n  {shown}{tail}")


class ReadOnlyError(SourceError):
    """A SQL source's query is not a single read-only statement, or its database cannot be
    opened read-only. The query was not run (or was rolled back by a read-only transaction)."""
