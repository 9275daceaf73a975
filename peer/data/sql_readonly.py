"""The read-only layers of :mod:`peer.data.sql`: the query-text check and the read-only
connection (see that module's docstring for why there are three layers, and what each stops).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, Engine, create_engine, event, make_url
from sqlalchemy.exc import ArgumentError

from .errors import ReadOnlyError, SourceIssue

__all__ = ["begin_read_only", "check_select_only", "read_only_engine"]

# Keywords that only a statement that writes (or changes the connection) contains. Matched
# as whole words outside comments, literals and quoted identifiers; INTO catches both
# INSERT INTO and PostgreSQL's table-creating SELECT ... INTO.
_WRITING_KEYWORDS = frozenset(
    [
        "insert",
        "update",
        "delete",
        "merge",
        "upsert",
        "create",
        "drop",
        "alter",
        "truncate",
        "grant",
        "revoke",
        "attach",
        "detach",
        "pragma",
        "vacuum",
        "reindex",
        "copy",
        "call",
        "lock",
        "into",
        "execute",
        "prepare",
        "deallocate",
        "listen",
        "notify",
        "refresh",
    ]
)
_DOLLAR_QUOTE = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")


def _code_of(query: str) -> str:
    """The query with comments removed and literals/quoted identifiers blanked out.

    Raises:
        ReadOnlyError: an unterminated comment, literal or identifier.
    """
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if query.startswith("--", i):
            end = query.find("\n", i)
            i = n if end < 0 else end
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            if end < 0:
                raise ReadOnlyError("query", [SourceIssue(None, "unterminated /* comment")])
            i = end + 2
            out.append(" ")
        elif c == "'" and _escape_string_prefix(query, i):
            # PostgreSQL's E'...': a backslash escapes the next character (a quote too).
            end = i + 1
            while end < n and query[end] != "'":
                end += 2 if query[end] == "\\" else 1
            if end >= n:
                raise ReadOnlyError("query", [SourceIssue(None, "unterminated E' quote")])
            i = end + 1
            out.append(" x ")
        elif c in "'\"`":
            # A doubled quote inside is an escaped quote: scanning to the next quote and
            # continuing handles it (the pair is two adjacent literals, both blanked).
            end = query.find(c, i + 1)
            if end < 0:
                raise ReadOnlyError("query", [SourceIssue(None, f"unterminated {c} quote")])
            i = end + 1
            out.append(" x ")
        elif (
            c == "$"
            and not _ends_identifier(query, i)  # a$b$ is an identifier, not a quote
            and (match := _DOLLAR_QUOTE.match(query, i)) is not None
        ):
            tag = match.group(0)
            end = query.find(tag, match.end())
            if end < 0:
                raise ReadOnlyError("query", [SourceIssue(None, f"unterminated {tag} quote")])
            i = end + len(tag)
            out.append(" x ")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _ends_identifier(query: str, i: int) -> bool:
    """Whether the character before ``i`` belongs to an identifier or keyword (PostgreSQL's
    identifiers may contain ``$`` after their first character)."""
    return i > 0 and (query[i - 1].isalnum() or query[i - 1] in "_$")


def _escape_string_prefix(query: str, i: int) -> bool:
    """Whether the quote at ``i`` opens an escape string: ``E'`` not ending an identifier."""
    return i > 0 and query[i - 1] in "eE" and not _ends_identifier(query, i - 1)


def check_select_only(query: str) -> None:
    """Refuse anything but one SELECT (or WITH ... SELECT) statement.

    Raises:
        ReadOnlyError: naming what was found (a second statement, a writing keyword...).
    """
    code = _code_of(query).strip()
    if code.endswith(";"):
        code = code[:-1].rstrip()
    problems = []
    if ";" in code:
        problems.append(SourceIssue(None, "more than one statement (a ';' inside the query)"))
    words = re.findall(r"[A-Za-z_][A-Za-z_0-9]*", code)
    if not words or words[0].lower() not in ("select", "with"):
        first = words[0] if words else "nothing"
        problems.append(SourceIssue(None, f"must start with SELECT or WITH, not {first}"))
    writing = sorted({w.upper() for w in words if w.lower() in _WRITING_KEYWORDS})
    if writing:
        problems.append(
            SourceIssue(
                None,
                f"{', '.join(writing)}: a source query only reads (SELECT); the database "
                "is never written",
            )
        )
    if problems:
        raise ReadOnlyError("query", problems)


def read_only_engine(url: str) -> Engine:
    """An engine whose connections cannot write (see the module header, layer 2).

    Raises:
        ReadOnlyError: the URL's dialect cannot be opened read-only here, or a SQLite URL
            names no file (or carries its own options).
    """
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise ReadOnlyError(url, [SourceIssue(None, f"not a SQLAlchemy URL: {error}")]) from None
    shown = parsed.render_as_string(hide_password=True)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:") or database.startswith("file:") or parsed.query:
            raise ReadOnlyError(
                shown,
                [
                    SourceIssue(
                        None,
                        "give a plain sqlite:///path/to/file.db URL: the source opens the "
                        "file read-only itself (mode=ro)",
                    )
                ],
            )
        engine = create_engine(f"sqlite:///file:{quote(database)}?mode=ro&uri=true")

        @event.listens_for(engine, "connect")
        def _query_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.close()

        return engine
    if backend == "postgresql":
        # libpq's "options" start every session read-only, and psycopg (3) can run the query
        # through the extended protocol, where the server itself refuses a second statement
        # (see SQLSource._fetch); psycopg2 always interpolates client-side.
        if parsed.get_driver_name() != "psycopg":
            raise ReadOnlyError(
                shown,
                [
                    SourceIssue(
                        None,
                        f"PostgreSQL driver {parsed.get_driver_name()!r} is not supported "
                        "here: use postgresql+psycopg://",
                    )
                ],
            )
        # standard_conforming_strings: a backslash in '...' is a character, as the text
        # check assumes (only E'...' strings take backslash escapes).
        options = "-c default_transaction_read_only=on -c standard_conforming_strings=on"
        return create_engine(parsed, connect_args={"options": options})
    raise ReadOnlyError(
        shown,
        [
            SourceIssue(
                None,
                f"read-only access cannot be enforced for {backend!r} databases here "
                "(supported: sqlite, postgresql)",
            )
        ],
    )


def begin_read_only(connection: Connection, where: str) -> None:
    """Make the current transaction read-only and check that it is (PostgreSQL)."""
    if connection.dialect.name != "postgresql":
        return
    connection.exec_driver_sql("SET TRANSACTION READ ONLY")
    state = connection.exec_driver_sql("SHOW transaction_read_only").scalar_one()
    if state != "on":
        raise ReadOnlyError(where, [SourceIssue(None, "the transaction is not read-only")])
