"""The one error tree of the ledger.

::

    LedgerError
     ├── LedgerReadError          the database cannot be read (missing, unreachable, corrupt)
     ├── LedgerWriteError         the database cannot be written (read-only, disk full, ...)
     ├── SessionError             unknown session, or a status change that is not allowed
     └── RecordRejected           an agreed record was refused; nothing was written
          ├── ChainMismatchError      its prev_hash is not its session's head
          ├── DuplicateRoundError     (session, round) already has an agreed record
          ├── NotEnoughSignaturesError
          ├── InvalidRecordError      malformed field, or a hash that does not match its data
          └── ImportRefusedError      an export failed verification; ``problems`` lists why

A peer that gets a :class:`LedgerWriteError` must refuse the round: it cannot record it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from peer.ledger._problems import LedgerProblem

__all__ = [
    "ChainMismatchError",
    "DuplicateRoundError",
    "ImportRefusedError",
    "InvalidRecordError",
    "LedgerError",
    "LedgerReadError",
    "LedgerWriteError",
    "NotEnoughSignaturesError",
    "RecordRejected",
    "SessionError",
]


class LedgerError(Exception):
    """Base class of every error raised by :mod:`peer.ledger`."""


class LedgerReadError(LedgerError):
    """The ledger database could not be read."""


class LedgerWriteError(LedgerError):
    """The ledger database could not be written (read-only file, full disk, lost server).

    Nothing of the failed transaction was kept; earlier records are intact.
    """


class SessionError(LedgerError):
    """The session is unknown, or the requested status change is not allowed."""


class RecordRejected(LedgerError):
    """An agreed record (or round bookkeeping) was refused; the ledger is unchanged."""


class ChainMismatchError(RecordRejected):
    """The record's ``prev_hash`` is not the head of its session's chain (the hash of the
    session's last agreed record, or its genesis hash), or its round is not that record's
    round + 1 (rounds are never skipped)."""


class DuplicateRoundError(RecordRejected):
    """The ledger already holds an agreed record for this (session, round)."""


class NotEnoughSignaturesError(RecordRejected):
    """Fewer valid signatures than required."""


class InvalidRecordError(RecordRejected):
    """A field is malformed, or a hash does not match the data it covers."""


class ImportRefusedError(RecordRejected):
    """An export did not verify, or does not continue the chains of this ledger's sessions.

    Attributes:
        problems: every problem found in the export (empty when the export itself was
            sound but does not link to a session's head in this ledger).
    """

    def __init__(self, message: str, problems: Sequence[LedgerProblem] = ()) -> None:
        details = "".join(f"\n  - {problem}" for problem in problems)
        super().__init__(message + details)
        self.problems: tuple[LedgerProblem, ...] = tuple(problems)


class VoteConflictError(RecordRejected):
    """This peer already signed a different record for the round: it never signs two."""
