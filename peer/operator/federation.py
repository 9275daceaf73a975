"""The operator's federation file: its certificate, key, CA and roster, and the session to run.

``federation.toml`` (paths are relative to the file)::

    [operator]
    cert = "operator/ceremony-operator.pem"
    key = "operator/ceremony-operator.key"      # mode 0600
    ca = "ca.pem"
    roster = "roster.json"                      # with roster.json.sig beside it

    [session]
    id = "study-1"                  # optional: default session-<UTC time>-<random>
    participants = ["hospital-a", "hospital-b", "hospital-c"]   # default: every roster peer
    rounds = 3
    threshold = 3                   # default: the lowest safe one (SECURITY.md)
    colluders = 1                   # participants that may collude, the aggregator included
    graph = "complete"              # or "secagg+" (then optionally degree = K)
    stage_seconds = 30
    prepare_seconds = 120

    [session.payload]
    kind = "vector"
    length = 1000
"""

from __future__ import annotations

import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..identity import Role, Roster, fingerprint, load_certificate
from ..session import SessionProposal
from .client import OperatorClient, OperatorError

__all__ = [
    "FederationFile",
    "build_proposal",
    "default_session_id",
    "load_federation",
    "operator_client",
]

_SESSION_KEYS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "participants": list,
    "rounds": int,
    "threshold": int,
    "colluders": int,
    "graph": str,
    "degree": int,
    "bits": int,
    "aggregation": str,
    "stage_seconds": (int, float),
    "prepare_seconds": (int, float),
    "seed": int,
    "payload": dict,
    "privacy": dict,
}


# --------------------------------------------------------------------------- federation.toml


@dataclass(frozen=True)
class FederationFile:
    """A parsed ``federation.toml``: the operator's files and the raw ``[session]`` table."""

    path: Path
    cert: Path
    key: Path
    ca: Path
    roster: Path
    session: Mapping[str, Any]


def load_federation(path: Path, *, payload_required: bool = True) -> FederationFile:
    """Read and check ``federation.toml``; every problem names the file and the key.

    Args:
        path: the file.
        payload_required: whether ``[session]`` must describe a payload and its ``rounds``
            (``ceremony run``); commands that bring their own payload (``ceremony stats``)
            only need the operator's files and, optionally, the session's other settings.

    Raises:
        OperatorError: missing or malformed file, missing keys, wrong types, missing files.
    """
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OperatorError(f"{path}: no such federation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise OperatorError(f"{path}: cannot read: {error}") from None
    except tomllib.TOMLDecodeError as error:
        raise OperatorError(f"{path}: not valid TOML: {error}") from None
    operator = document.get("operator")
    if not isinstance(operator, dict):
        raise OperatorError(f"{path}: missing [operator] table (cert, key, ca, roster)")
    session = document.get("session", None if payload_required else {})
    if not isinstance(session, dict):
        raise OperatorError(f"{path}: missing [session] table (participants, rounds, payload)")
    unknown = sorted(set(document) - {"operator", "session"})
    if unknown:
        raise OperatorError(f"{path}: unknown table(s) {', '.join(unknown)}")

    def file(key: str) -> Path:
        value = operator.get(key)
        if not isinstance(value, str):
            raise OperatorError(f"{path} [operator]: '{key}' must be a path (string)")
        resolved = (path.parent / value).resolve()
        if not resolved.is_file():
            raise OperatorError(
                f"{path} [operator]: '{key}' = {value!r}: no such file ({resolved})"
            )
        return resolved

    for key, value in session.items():
        kind = _SESSION_KEYS.get(key)
        if kind is None:
            raise OperatorError(
                f"{path} [session]: unknown key '{key}' (known: {', '.join(_SESSION_KEYS)})"
            )
        if isinstance(value, bool) or not isinstance(value, kind):
            raise OperatorError(f"{path} [session]: '{key}' has the wrong type: {value!r}")
    payload = session.get("payload")
    if payload_required and (payload is None or not isinstance(payload.get("kind"), str)):
        raise OperatorError(f"{path} [session.payload]: missing 'kind' (e.g. kind = \"vector\")")
    if payload_required and "rounds" not in session:
        raise OperatorError(f"{path} [session]: missing required key 'rounds'")
    return FederationFile(
        path=path,
        cert=file("cert"),
        key=file("key"),
        ca=file("ca"),
        roster=file("roster"),
        session=session,
    )


def default_session_id(now: datetime) -> str:
    """A fresh session id: readable time plus a random suffix so two runs never collide."""
    return f"session-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def build_proposal(
    federation: FederationFile, roster: Roster, session_id: str | None = None
) -> SessionProposal:
    """The :class:`~peer.session.SessionProposal` that ``federation``'s ``[session]`` describes.

    Raises:
        OperatorError: a participant not in the roster, or a proposal the library rejects.
    """
    table = federation.session
    where = f"{federation.path} [session]"
    peers = [e.peer_id for e in roster.entries if e.role is Role.PEER]
    participants = [str(p) for p in table.get("participants", peers)]
    strangers = [p for p in participants if p not in peers]
    if strangers:
        raise OperatorError(
            f"{where}: participants {', '.join(strangers)} are not peers in the roster "
            f"{federation.roster} (its peers: {', '.join(peers)})"
        )
    graph = str(table.get("graph", "complete"))
    degree = table.get("degree")
    sid = session_id or str(table.get("id") or default_session_id(datetime.now(UTC)))
    try:
        return SessionProposal(
            session_id=sid,
            participants=tuple(participants),
            rounds=int(table["rounds"]),
            threshold=int(
                table.get(
                    "threshold",
                    SessionProposal.default_threshold(
                        len(participants),
                        int(table.get("colluders", 1)),
                        graph,
                        None if degree is None else int(degree),
                    ),
                )
            ),
            payload=dict(table["payload"]),
            graph=graph,
            degree=None if degree is None else int(degree),
            bits=int(table.get("bits", 32)),
            aggregation=str(table.get("aggregation", "secagg")),
            privacy=dict(table.get("privacy", {})),
            stage_seconds=float(table.get("stage_seconds", 30.0)),
            prepare_seconds=float(table.get("prepare_seconds", 120.0)),
            seed=int(table.get("seed", 0)),
            colluders=int(table.get("colluders", 1)),
            # Never aggregators; every peer checks this against its roster (peer/session.py).
            outbound_only=tuple(p for p in participants if not roster[p].inbound),
        )
    except ValueError as error:  # ProposalError, or an unknown graph kind
        raise OperatorError(f"{where}: {error}") from None


def operator_client(federation: FederationFile) -> OperatorClient:
    """An :class:`OperatorClient` for the operator named by its certificate.

    Raises:
        OperatorError: the certificate is not in the roster.
        IdentityError, ValueError, OSError: a file cannot be read or is not what it should be.
    """
    mine = fingerprint(load_certificate(federation.cert))
    client = OperatorClient.from_files(
        "?", federation.cert, federation.key, federation.ca, federation.roster
    )
    entry = next((e for e in client.roster.entries if e.cert_fingerprint_sha256 == mine), None)
    if entry is None:
        raise OperatorError(
            f"{federation.path} [operator]: certificate {federation.cert} is not in the roster "
            f"{federation.roster}; the peers would refuse it"
        )
    client.me = entry.peer_id
    return client
