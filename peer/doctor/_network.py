"""Reachability: an mTLS health check of every roster peer, and of this site's own address."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator, Sequence

from peer.config import PeerConfig
from peer.doctor._report import Finding, Status
from peer.identity import Role, Roster
from peer.tls import (
    HandshakeError,
    PeerRejectedError,
    TLSFiles,
    TransportError,
    check_peer,
    peer_channel,
)


def check_network(config: PeerConfig, roster: Roster, timeout: float) -> Iterator[Finding]:
    """One finding per other roster peer, one if none answers, and one for inbound."""
    others = [e for e in roster.peers if e.peer_id != config.peer_id]
    dialled = [e for e in others if e.inbound]
    results = asyncio.run(_dial_all(config, roster, [e.peer_id for e in dialled], timeout))
    reachable = 0
    for entry in others:
        if not entry.inbound:
            # Nobody can dial it (its firewall accepts no inbound connection): it keeps a
            # control stream to a relay, and is reached through it (peer/relay.py).
            yield Finding(
                f"peer {entry.peer_id}",
                Status.OK,
                "outbound-only: not dialled (reached through a relay)",
            )
            continue
        error = results[entry.peer_id]
        if error is None:
            reachable += 1
            yield Finding(f"peer {entry.peer_id}", Status.OK, f"answers at {entry.address}")
        else:
            yield Finding(
                f"peer {entry.peer_id}",
                _dial_status(error),
                str(error),
                _dial_action(error, entry.address or "?"),
            )
    if others and reachable == 0:
        yield Finding(
            "peers",
            Status.FAIL,
            f"none of the {len(others)} other peers answers: this site cannot take part",
            "check this site's outbound firewall to the roster addresses",
        )
    yield from _inbound(config, roster, timeout, results)


async def _dial_all(
    config: PeerConfig, roster: Roster, peer_ids: Sequence[str], timeout: float
) -> dict[str, TransportError | None]:
    results = await asyncio.gather(*(_dial(config, roster, p, timeout) for p in peer_ids))
    return dict(zip(peer_ids, results, strict=True))


async def _dial(
    config: PeerConfig, roster: Roster, peer_id: str, timeout: float
) -> TransportError | None:
    """The error of one health check of ``peer_id`` at its roster address, or None."""
    files = TLSFiles(config.cert, config.key, config.ca)
    target = roster[peer_id].address or "?"
    try:
        async with peer_channel(roster, peer_id, files) as channel:
            await check_peer(channel, target=target, peer=peer_id, timeout=timeout, attempts=1)
    except TransportError as error:
        return error
    return None


def _inbound(
    config: PeerConfig,
    roster: Roster,
    timeout: float,
    dialled: dict[str, TransportError | None],
) -> Iterator[Finding]:
    entry = roster.get(config.peer_id)
    if entry is None or entry.role is not Role.PEER:
        return  # reported by the roster entry check
    if entry.address is None:
        yield _relay_finding(config, dialled)
        return
    error = asyncio.run(_dial(config, roster, config.peer_id, timeout))
    if error is None:
        yield Finding(
            "inbound",
            Status.OK,
            f"this peer answers at its roster address {entry.address} (seen from this "
            "machine; other sites' doctor checks the path through the firewall)",
        )
        return
    if _port_is_free(config.listen):
        yield Finding(
            "inbound",
            Status.WARN,
            f"nothing listens on {config.listen}: the peer is not running, so inbound "
            "reachability was not checked",
            "start the peer and run doctor again",
        )
        return
    yield Finding(
        "inbound",
        Status.FAIL,
        f"something listens on {config.listen}, but our roster address {entry.address} "
        f"does not answer as this peer: {error}",
        "check that the roster address resolves to this machine and that the process on "
        "the port is this peer",
    )


def _relay_finding(config: PeerConfig, dialled: dict[str, TransportError | None]) -> Finding:
    """An outbound-only site: no inbound check; one of its relays must answer."""
    relays = [p for p in (config.relays or dialled) if p in dialled]
    answering = [p for p in relays if dialled[p] is None]
    if answering:
        return Finding(
            "inbound",
            Status.OK,
            f"outbound-only: inbound check skipped; relay reachable ({', '.join(answering)} "
            "answers; the peer keeps its control stream there)",
        )
    named = ", ".join(config.relays) or "every reachable roster peer"
    return Finding(
        "inbound",
        Status.FAIL,
        f"outbound-only: inbound check skipped; no relay reachable (tried {named}): nobody "
        "can reach this site's peer",
        "open the outbound firewall to a relay's roster address, or name reachable peers in "
        "[relay] peers",
    )


def _dial_status(error: TransportError) -> Status:
    # A peer that is down is its problem (and the federation tolerates dropouts); a peer
    # that refuses us, or that we refuse, is a configuration problem on one side.
    return Status.FAIL if isinstance(error, HandshakeError | PeerRejectedError) else Status.WARN


def _dial_action(error: TransportError, address: str) -> str:
    if isinstance(error, PeerRejectedError):
        return "that peer does not accept our certificate: check that it runs the current roster"
    if isinstance(error, HandshakeError):
        return (
            "the TLS handshake failed: compare both sites' CA fingerprints and rosters, and "
            "check the certificate dates"
        )
    return f"the peer may be down; otherwise open the outbound firewall to {address}"


def _port_is_free(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True
