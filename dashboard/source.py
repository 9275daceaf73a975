"""Read-only access to a peer's ledger: one :class:`Snapshot` per refresh.

Read-only, by two means:

- The database connection itself is opened read-only where the backend allows it: SQLite
  files through a ``file:...?mode=ro`` URI (any write fails with "attempt to write a
  readonly database"), PostgreSQL with ``default_transaction_read_only=on``.
- On any backend, the dashboard only calls the ledger's read methods (``sessions``,
  ``agreed_records``, ``round_attempts``, ``statistics_results``, ``head``),
  ``peer verify-ledger``'s check (:class:`~peer.ledger_check.LedgerCheck`) and the verifier's
  raw reader ``read_records``; it never
  calls ``create`` or a write method, so it cannot create tables or records even where the
  connection would allow it.

The ledger is shared with the running peer: SQLite's write-ahead log lets the dashboard read
while the peer writes, and each read sees the last committed round.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from peer.acceptances import Acceptance, check_acceptances
from peer.ledger import (
    ChargedRelease,
    Ledger,
    LedgerError,
    LedgerReadError,
    LedgerReport,
    RoundAttempt,
    SessionInfo,
    StatisticsResult,
    StoredRecord,
)
from peer.ledger._verify import RawRecord, read_records
from peer.ledger_check import LedgerCheck
from secagg.crypto import Verifier

__all__ = ["LedgerSource", "LedgerSourceError", "Snapshot", "read_only_url"]


class LedgerSourceError(ValueError):
    """The ledger URL or file cannot be used (the message says what is wrong)."""


def _sqlite_read_only(url: URL) -> str:
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise LedgerSourceError(
            "an in-memory SQLite ledger exists only inside the peer that made it; "
            "give the path of the peer's ledger file"
        )
    if database.startswith("file:"):
        # Already a SQLite URI: force read-only on top of what it asks.
        query = dict(url.query)
        query.update({"mode": "ro", "uri": "true"})
        return url.set(query=query).render_as_string(hide_password=False)
    path = Path(database).expanduser().resolve()
    if not path.is_file():
        raise LedgerSourceError(f"no ledger file at {path}")
    return f"sqlite:///file:{quote(str(path))}?mode=ro&uri=true"


def read_only_url(url: str) -> str:
    """The SQLAlchemy URL that opens ``url`` read-only where the backend supports it.

    Args:
        url: a SQLAlchemy URL (``sqlite:////var/lib/peer/ledger.db``,
            ``postgresql+psycopg://dashboard@db/ledger``) or the path of a SQLite file.

    Raises:
        LedgerSourceError: malformed URL, in-memory database, or a SQLite file that does
            not exist (opening it would otherwise create an empty one).
    """
    if "://" not in url:
        return _sqlite_read_only(make_url("sqlite:///" + url))
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise LedgerSourceError(f"not a database URL: {url!r} ({exc})") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_read_only(parsed)
    if backend == "postgresql":
        query = dict(parsed.query)
        options = query.get("options", "")
        extra = "-c default_transaction_read_only=on"
        query["options"] = f"{options} {extra}".strip() if isinstance(options, str) else extra
        return parsed.set(query=query).render_as_string(hide_password=False)
    return url


def shown_url(url: str) -> str:
    """``url`` as it may be displayed (password hidden)."""
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(malformed URL)"


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the dashboard shows at one moment.

    Attributes:
        sessions: every session of the ledger, oldest first.
        all_records: every agreed record (for the per-session round counts).
        session: the selected session (None when the ledger has none).
        records: the selected session's agreed records, in round order.
        attempts: this peer's attempts at the selected session's rounds.
        statistics: the selected session's statistics results.
        report: the verification of the whole ledger (signatures only counted, not
            verified, without a roster), or None when it could not run.
        check_error: why the verification could not run, if it failed.
        head: ``(seq, record_hash)`` of the ledger's last record.
        charges: every privacy charge in the ledger (the owning hospital's, all sessions,
            aborted attempts included).
        acceptances: each participant's signed acceptance of the selected session's
            proposal, checked with the roster keys when the source has them.
    """

    sessions: tuple[SessionInfo, ...]
    all_records: tuple[StoredRecord, ...]
    session: SessionInfo | None
    records: tuple[StoredRecord, ...]
    attempts: tuple[RoundAttempt, ...]
    statistics: tuple[StatisticsResult, ...]
    report: LedgerReport | None
    check_error: str | None
    head: tuple[int, bytes]
    charges: tuple[ChargedRelease, ...] = ()
    acceptances: tuple[Acceptance, ...] = ()
    stored_key: str = ""
    """A fingerprint of every session and record exactly as stored (set by
    :class:`LedgerSource`, which reads them for it anyway); the records shown derive from
    them, so the digest uses it instead of writing out a thousand records again."""

    def digest(self) -> str:
        """A short fingerprint of the visible content: equal digests draw the same page."""
        # The dataclasses' reprs are deterministic (datetimes, bytes, tuples, dicts in
        # insertion order of deterministic queries), so this changes exactly when a shown
        # value does.
        stored: Any = self.stored_key or (self.sessions, self.records)
        text = repr(
            (
                stored,
                self.session.session_id if self.session else None,
                self.head,
                self.attempts,
                self.statistics,
                self.report,
                self.check_error,
                self.acceptances,
                self.charges,
            )
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class LedgerSource:
    """A read-only view of one ledger, with the verification cached per ledger content.

    Every snapshot carries the report of ``peer verify-ledger``'s check of the whole ledger
    (:class:`~peer.ledger_check.LedgerCheck`, the same code): with ``verifiers`` everything
    including the signatures, the signed acceptances, each round's stored evidence and the
    vote releases; without them everything that needs no key (hash chain, record, metrics
    and proposal hashes, checkpoints, the number of signatures, each stored round's
    parameters against the accepted proposal). The check re-runs whenever a record or
    session read differs from the last check (a value edited in place, not only a new
    round), and at least every ``recheck_s`` seconds. A re-run redoes only what changed
    (records appended after an unchanged chain, evidence rows not seen before; see
    :class:`~peer.ledger_check.LedgerCheck`), except that every ``recheck_s`` seconds it
    re-reads every checkpoint (too large to read on every refresh): that catches an edited
    checkpoint, and one edited at the moment a round is appended.

    Args:
        url: as for :func:`read_only_url`.
        verifiers: roster keys by peer id, or None to check without keys.
        recheck_s: the longest time a verification is reused for unchanged records.
        monotonic: seconds from a monotonic clock (injected for tests).

    Raises:
        LedgerSourceError: see :func:`read_only_url`.
    """

    def __init__(
        self,
        url: str,
        *,
        verifiers: Mapping[str, Verifier] | None = None,
        recheck_s: float = 60.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = shown_url(url)
        try:
            self._ledger = Ledger(read_only_url(url))
        except ArgumentError as exc:
            # Unknown dialect ("Can't load plugin: sqlalchemy.dialects:...") or bad options.
            raise LedgerSourceError(f"cannot use {self.url}: {exc}") from None
        except ImportError as exc:
            raise LedgerSourceError(
                f"cannot use {self.url}: its database driver is not installed ({exc})"
            ) from None
        self._check = LedgerCheck(verifiers)
        self._verifiers = self._check.verifiers  # remembering the signatures found genuine
        self._recheck_s = recheck_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._checked: tuple[str, float, LedgerReport | None, str | None] | None = None
        self._checkpoints_at: float | None = None  # when every checkpoint was last read
        # (key, the stored records as read plainly, the records as objects)
        self._records_cache: tuple[str, tuple[RawRecord, ...], tuple[StoredRecord, ...]] | None = (
            None
        )

    @property
    def signatures_checked(self) -> bool:
        """True when roster keys were given, so signatures are verified too."""
        return self._verifiers is not None

    def close(self) -> None:
        """Close the database connections."""
        self._ledger.close()

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """Database failures as :class:`LedgerReadError` naming the ledger and the reason."""
        try:
            yield
        except LedgerError as exc:
            # The ledger's message shows the read-only URI we made; show the user's URL.
            cause = exc.__cause__
            reason = str(getattr(cause, "orig", None) or cause or exc)
            if "no such table" in reason:
                reason += " (this database holds no peer ledger)"
            raise LedgerReadError(f"cannot read the ledger {self.url}: {reason}") from exc
        except DBAPIError as exc:
            # e.g. "file is not a database", which the ledger does not map itself.
            raise LedgerReadError(f"cannot read the ledger {self.url}: {exc.orig}") from exc

    def probe(self) -> int:
        """Read the ledger once and return its number of sessions.

        Raises:
            LedgerReadError: the database cannot be read or holds no ledger.
        """
        with self._reading():
            return len(self._ledger.sessions())

    def _verification(
        self, key: str, raw: Sequence[RawRecord]
    ) -> tuple[LedgerReport | None, str | None]:
        # The check reads every session, proof and (now and then) checkpoint: do it once per
        # ledger state, not once per browser refresh.
        with self._lock:
            now = self._monotonic()
            if self._checked is not None:
                checked_key, at, cached_report, cached_error = self._checked
                if checked_key == key and now - at < self._recheck_s:
                    return cached_report, cached_error
            every_checkpoint = (
                self._checkpoints_at is None or now - self._checkpoints_at >= self._recheck_s
            )
            report: LedgerReport | None = None
            error: str | None = None
            try:
                with self._reading():
                    report = self._check.run(self._ledger, raw, all_checkpoints=every_checkpoint)
                if every_checkpoint:
                    self._checkpoints_at = now
            except LedgerError as exc:
                error = str(exc)
            self._checked = (key, now, report, error)
            return report, error

    def sessions(self) -> tuple[SessionInfo, ...]:
        """Every session of the ledger (a cheap read, to choose one before a snapshot).

        Raises:
            LedgerReadError: the ledger cannot be read.
        """
        with self._reading():
            return tuple(self._ledger.sessions())

    def _records(self, key: str, raw: Sequence[RawRecord]) -> tuple[StoredRecord, ...]:
        # The ledger's agreed_records builds an object per record and per signature: about
        # ten times slower than the plain SELECTs of read_records (3 s against 0.3 s for
        # 1,000 rounds of 20 hospitals). So the plain read decides whether anything
        # changed, and objects are built only for what did: the new records when the
        # stored ones are exactly as before (a round appended), else all of them.
        with self._lock:
            cached = self._records_cache
        if cached is not None and cached[0] == key:
            return cached[2]
        before = cached[1] if cached is not None else ()
        if cached is not None and cached[2] and tuple(raw[: len(before)]) == before:
            kept = cached[2]
            records = kept + tuple(self._ledger.agreed_records(after_seq=kept[-1].seq))
        else:
            records = tuple(self._ledger.agreed_records())
        with self._lock:
            self._records_cache = (key, tuple(raw), records)
        return records

    def snapshot(self, session_id: str | None) -> Snapshot:
        """Read everything shown for ``session_id`` (None or unknown: no session selected).

        Raises:
            LedgerReadError: the ledger cannot be read.
        """
        # Separate read transactions: a round agreed between two reads shows in full at
        # the next refresh, and the head is taken from the records actually read.
        records: tuple[StoredRecord, ...] = ()
        attempts: tuple[RoundAttempt, ...] = ()
        statistics: tuple[StatisticsResult, ...] = ()
        commitments: dict[str, tuple[bytes, bytes]] | None = None
        with self._reading():
            sessions = tuple(self._ledger.sessions())
            # Every value stored, not just the head: a metric edited in place in an old
            # record leaves the head unchanged but must be re-checked at once.
            raw = read_records(self._ledger)
            key = hashlib.sha256(repr((sessions, raw)).encode("utf-8")).hexdigest()
            all_records = self._records(key, raw)
            session = next((s for s in sessions if s.session_id == session_id), None)
            if session is not None:
                wanted = session.session_id
                records = tuple(r for r in all_records if r.record.session_id == wanted)
                attempts = tuple(self._ledger.round_attempts(wanted))
                statistics = tuple(self._ledger.statistics_results(wanted))
                beacon = self._ledger.beacon_state(wanted)
                if beacon is not None and beacon.commitments is not None:
                    commitments = dict(beacon.commitments)
            charges = tuple(
                charge
                for peer_id in self._ledger.privacy_peers()
                for charge in self._ledger.privacy_charges(peer_id)
            )
        head = (all_records[-1].seq, all_records[-1].record_hash) if all_records else (0, b"")
        report, error = self._verification(key, raw)
        acceptances = (
            check_acceptances(session, commitments, self._verifiers) if session is not None else ()
        )
        return Snapshot(
            sessions=sessions,
            all_records=all_records,
            session=session,
            records=records,
            attempts=attempts,
            statistics=statistics,
            report=report,
            check_error=error,
            head=head,
            charges=charges,
            acceptances=acceptances,
            stored_key=key,
        )
