"""The ledger's database plumbing: the engine, its transactions, and the one place where
database failures become ledger errors.

SQLite connections are set up for durability: write-ahead log, ``synchronous=FULL`` (a
commit has reached the disk before it returns, so a power cut cannot lose an agreed round
that peers were told about) and enforced foreign keys. On other backends the server's own
durability settings apply. Write transactions start with ``BEGIN IMMEDIATE`` on SQLite, so
that two writers queue instead of racing.

:class:`LedgerStore` is the base of :class:`~peer.ledger.Ledger`. Its
:meth:`~LedgerStore.transaction` and :meth:`~LedgerStore.now` are the API that the
ledger's own modules (the jobs of ``Ledger``, verification, import) build on, instead of
reaching into each other's private methods.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Self

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import DatabaseError, IntegrityError, InternalError, OperationalError
from sqlalchemy.orm import Session
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from peer.ledger._errors import LedgerError, LedgerReadError, LedgerWriteError, RecordRejected
from peer.ledger._schema import SCHEMA_VERSION, Base, MetaRow

__all__ = ["Clock", "LedgerStore", "check_peers", "loads_json", "system_clock"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware datetime."""


def system_clock() -> datetime:
    """The production clock: the current UTC time."""
    return datetime.now(UTC)


# Execution option that asks the SQLite ``begin`` hook for a write (IMMEDIATE) transaction.
_WRITE = "ledger_write"

# Database errors that mean the database cannot be used right now.
_UNUSABLE = (OperationalError, InternalError)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # pysqlite's own transaction handling starts transactions lazily (after a SELECT)
        # and commits behind our back on DDL; we issue BEGIN ourselves in ``_on_begin``.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
            mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode not in ("wal", "memory"):
                try:
                    cursor.execute("PRAGMA journal_mode=WAL")
                except sqlite3.OperationalError as exc:
                    # A read-only file can still be read; writes will fail with a clear
                    # LedgerWriteError. Anything else should be visible to the operator.
                    log.warning("could not switch the ledger to WAL mode: %s", exc)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = bool(conn.get_execution_options().get(_WRITE, False))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def loads_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise LedgerReadError(f"{what} is not valid JSON: {exc}") from exc


def check_peers(peers: Sequence[str], what: str) -> tuple[str, ...]:
    if isinstance(peers, str):
        raise TypeError(f"{what} must be a sequence of peer ids, not a string")
    seen: set[str] = set()
    for peer_id in peers:
        if not isinstance(peer_id, str) or not peer_id:
            raise ValueError(f"{what}: peer ids must be non-empty strings, got {peer_id!r}")
        if peer_id in seen:
            raise ValueError(f"{what}: peer {peer_id!r} is listed twice")
        seen.add(peer_id)
    return tuple(peers)


class LedgerStore:
    """A ledger database: engine, transactions and error mapping (see the module doc).

    Args:
        url: a SQLAlchemy URL, e.g. ``sqlite:////var/lib/peer/ledger.db`` or
            ``postgresql+psycopg://peer@db/ledger``.
        clock: the time source for every timestamp the ledger writes.
    """

    def __init__(self, url: str | URL, clock: Clock = system_clock) -> None:
        self._url = make_url(url)
        self._shown_url = self._url.render_as_string(hide_password=True)
        self._clock = clock
        options: dict[str, Any] = {}
        sqlite = self._url.get_backend_name() == "sqlite"
        if sqlite and self._url.database in (None, "", ":memory:"):
            # One in-memory database only exists while its one connection lives.
            options = {"poolclass": StaticPool, "connect_args": {"check_same_thread": False}}
        self._engine = create_engine(self._url, **options)
        if sqlite and self._engine.dialect.driver == "pysqlite":
            _configure_sqlite(self._engine)

    # ------------------------------------------------------------------ plumbing

    @property
    def url(self) -> str:
        """The database URL, with any password hidden."""
        return self._shown_url

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine (for read-only consumers such as the dashboard)."""
        return self._engine

    def close(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({self._shown_url!r})"

    def now(self) -> datetime:
        """The clock's current time (checked to be timezone-aware)."""
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError(f"the ledger clock must return aware datetimes, got {now!r}")
        return now

    @contextmanager
    def _db_errors(self, *, write: bool) -> Iterator[None]:
        """Map database failures to ledger errors, in this one place."""
        try:
            yield
        except IntegrityError as exc:
            reason = str(exc.orig) if exc.orig is not None else str(exc)
            raise RecordRejected(
                f"the ledger at {self._shown_url} refused the write ({reason}); another "
                "writer may have changed it at the same time"
            ) from exc
        except DatabaseError as exc:
            # OperationalError and InternalError: unreachable, locked, read-only, full. The
            # base class itself: a file that is not a database, or a corrupt one. Other
            # subclasses (ProgrammingError, DataError, ...) are bugs of this program: raised
            # as they are.
            if not isinstance(exc, _UNUSABLE) and type(exc) is not DatabaseError:
                raise
            reason = str(exc.orig) if exc.orig is not None else str(exc)
            if write:
                raise LedgerWriteError(
                    f"cannot write the ledger at {self._shown_url}: {reason}"
                ) from exc
            raise LedgerReadError(f"cannot read the ledger at {self._shown_url}: {reason}") from exc

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Session]:
        """One database transaction; committed when the block ends without an exception.

        Database failures inside it are raised as :class:`LedgerReadError` (or
        :class:`LedgerWriteError` when ``write``) and :class:`RecordRejected`.
        """
        with self._db_errors(write=write), self._engine.connect() as conn:
            if write:
                conn.execution_options(**{_WRITE: True})
            with (
                conn.begin(),
                Session(bind=conn, join_transaction_mode="rollback_only") as session,
            ):
                yield session
                session.flush()

    # ------------------------------------------------------------------ schema

    def create(self) -> None:
        """Create the tables if they do not exist, and check the schema version.

        Raises:
            LedgerWriteError: the database cannot be written.
            LedgerError: the database holds a ledger of another schema version.
        """
        with self._db_errors(write=True):
            Base.metadata.create_all(self._engine)
        with self.transaction(write=True) as session:
            row = session.get(MetaRow, "schema_version")
            if row is None:
                session.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            elif row.value != str(SCHEMA_VERSION):
                raise LedgerError(
                    f"the ledger at {self._shown_url} has schema version {row.value}; "
                    f"this program understands version {SCHEMA_VERSION}"
                )
