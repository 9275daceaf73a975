"""Databases and disk: reachability, a write probe that changes nothing, the ledger's growth."""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime
from pathlib import Path

from peer.doctor._report import Finding, Status

GROWTH_HORIZON_DAYS = 90
"""Free disk space should hold this many days of the ledger's expected growth."""
MIN_FREE_BYTES = 1 << 30
"""... and never less than 1 GiB (a young ledger has no history to extrapolate from; one
agreed round of a large model stores its checkpoint, tens of MB)."""
CRITICAL_FREE_BYTES = 100 << 20
"""Below 100 MiB free the next checkpoint may not fit: FAIL."""


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for in-memory or other databases)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = parsed.database
    if database.startswith("file:"):  # SQLite's URI form: file:path?mode=ro
        database = database[len("file:") :].partition("?")[0]
    return Path(database)


def existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate if candidate.is_dir() else candidate.parent
    return Path("/")


# Written inside a transaction that is always rolled back: proves the write path, changes
# nothing.
_PROBE_SQL = (
    "CREATE TABLE _peer_doctor_probe (x INTEGER)",
    "INSERT INTO _peer_doctor_probe VALUES (1)",
)


def probe_database(check: str, url: str) -> Finding:
    """Connect to ``url`` and prove it writable inside a transaction that is rolled back.

    SQLite: ``BEGIN IMMEDIATE`` (takes the write lock), create a probe table and insert a
    row, ``ROLLBACK``. PostgreSQL: the same in an ordinary transaction (its DDL is
    transactional). Other databases commit DDL implicitly, so they are only read.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        parent = path.parent
        if parent.is_dir() and os.access(parent, os.W_OK):
            return Finding(
                check, Status.OK, f"{path} does not exist yet; the peer creates it when needed"
            )
        return Finding(
            check,
            Status.FAIL,
            f"{path} does not exist and {parent} is not a writable folder",
            f"create {parent} writable by the peer's user, or fix [storage] in the config",
        )
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            backend = engine.dialect.name
            if backend == "sqlite":
                raw = conn.connection.dbapi_connection
                assert raw is not None
                # pysqlite would not open a transaction before DDL (it would commit the
                # probe table at once): take over transaction control and BEGIN ourselves.
                raw.isolation_level = None
                cursor = raw.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in _PROBE_SQL:
                            cursor.execute(statement)
                    finally:
                        cursor.execute("ROLLBACK")
                finally:
                    cursor.close()
            elif backend == "postgresql":
                with conn.begin() as transaction:
                    for statement in _PROBE_SQL:
                        conn.execute(text(statement))
                    transaction.rollback()
            else:
                conn.execute(text("SELECT 1"))
                return Finding(
                    check,
                    Status.WARN,
                    f"{shown} is reachable; writability not probed ({backend} commits DDL "
                    "implicitly, and doctor changes nothing)",
                    "check that the peer's database user may create tables and insert",
                )
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        return Finding(
            check,
            Status.FAIL,
            f"{shown}: {reason}",
            "make the database writable by the peer's user (file and folder for SQLite)",
        )
    except sqlite3.Error as error:  # raised by the raw cursor, below SQLAlchemy's wrapping
        return Finding(
            check,
            Status.FAIL,
            f"{shown}: {error}",
            "make the database file and its folder writable by the peer's user",
        )
    finally:
        engine.dispose()
    return Finding(check, Status.OK, f"{shown} reachable and writable (probe rolled back)")


def expected_growth(url: str, path: Path, now: datetime) -> tuple[int, str]:
    """Bytes of free disk the ledger should have, and how that was estimated.

    The rule: :data:`GROWTH_HORIZON_DAYS` of the ledger's growth so far (its size, with the
    WAL, divided by the days since its first session), and at least :data:`MIN_FREE_BYTES`.
    """
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    first = _first_session(url) if size else None
    if first is None or size == 0:
        return MIN_FREE_BYTES, "no ledger history yet: the 1 GiB minimum"
    days = max((now - first).total_seconds() / 86400, 1.0)
    need = int(size / days * GROWTH_HORIZON_DAYS)
    basis = (
        f"the ledger grew {size_text(size)} in {days:.0f} days: {GROWTH_HORIZON_DAYS} more days at "
        "that rate, at least 1 GiB"
    )
    return max(need, MIN_FREE_BYTES), basis


def _first_session(url: str) -> datetime | None:
    from sqlalchemy.exc import SQLAlchemyError

    from peer.ledger import Ledger, LedgerError

    try:
        with Ledger(url) as ledger:
            sessions = ledger.sessions()
    except (LedgerError, SQLAlchemyError):  # an unreadable ledger gives no history
        return None
    return min((s.created_at for s in sessions), default=None)


def size_text(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
