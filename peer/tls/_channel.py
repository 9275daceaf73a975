"""The mTLS transport's plumbing: gRPC options and credentials, the server, client
channels, and the health check (see :mod:`peer.tls` for the theory of operation)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from peer.identity import (
    IdentityError,
    KeyFileError,
    Role,
    Roster,
    identity_hostname,
    load_certificate,
    load_private_key,
    read_private_key_pem,
)
from peer.identity._files import StrPath
from peer.tls._auth import Authenticator, AuthInterceptor
from peer.tls._clock import WallClock, clock_handler, system_now
from peer.tls._errors import PeerNotServingError, map_rpc_error

__all__ = [
    "CHANNEL_OPTIONS",
    "SERVER_OPTIONS",
    "TLSFiles",
    "channel_credentials",
    "check_peer",
    "create_server",
    "peer_channel",
    "secure_channel",
    "server_credentials",
]

# The transport logs under one name, as before it was cut into modules.
logger = logging.getLogger("peer.tls")

# Keepalive: peers hold long bidirectional streams across hospital firewalls and NATs that
# drop idle TCP connections, so both sides ping. A ping also finds a dead link: a partitioned
# peer drops packets without a RST, and an unanswered ping (keepalive_timeout, which gRPC also
# sets as TCP_USER_TIMEOUT for unacknowledged data) fails the connection within
# keepalive_time + keepalive_timeout = 10 s even while a stream only waits; the round's own
# per-stage silence limits (peer/round/participating.py) usually notice sooner. The server
# must accept the client's ping rate (min_ping_interval <= client keepalive_time, with room
# for timer jitter), or it answers with GOAWAY "too_many_pings".
STREAM_READ_AHEAD_BYTES = 1 << 20
"""What grpc may buffer of one incoming stream that this peer has not read yet."""
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
    # grpc sets SO_REUSEPORT by default: a second peer started on the same port would then
    # silently share it. Fail loudly instead.
    ("grpc.so_reuseport", 0),
    # Read-ahead per incoming stream, fixed (issue 11). With grpc's default BDP probing the
    # window grows until a sender can push its whole message into this process before the
    # handler reads it: while an aggregator's event loop sums one masked input, every other
    # participant's input sat in grpc's buffers, one vector per peer (measured 4.1 MiB per
    # stream of 4 MiB sent; 0.1 MiB without BDP probing, 1 MiB with this read-ahead). The
    # price is upload speed on slow links: one stream moves at most this much per round trip
    # (20 MB/s at 50 ms). This bounds a stream whose handler is not reading; while handlers
    # read, what bounds the aggregator is the small fragments participants send (64 KiB,
    # peer/round/participating.py; BENCHMARKS.md "lane 11t"): grpc holds a whole fragment
    # per stream until it is complete.
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", STREAM_READ_AHEAD_BYTES),
)
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 10_000),
)


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class TLSFiles:
    """The three files a peer or operator needs for mTLS.

    Attributes:
        cert: its certificate (PEM), issued by the consortium CA.
        key: its private key (PEM, mode 0600).
        ca: the consortium root CA certificate (PEM), verified out of band by fingerprint.
    """

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def of(cls, cert: StrPath, key: StrPath, ca: StrPath) -> TLSFiles:
        return cls(Path(cert), Path(key), Path(ca))


def _load_pair(cert: StrPath, key: StrPath) -> tuple[bytes, bytes]:
    """PEM bytes of a matching (key, certificate) pair, refusing an unsafe key file."""
    key_pem = read_private_key_pem(key)
    cert_obj = load_certificate(cert)
    if load_private_key(key).public_key() != cert_obj.public_key():
        raise KeyFileError(f"private key {key} does not belong to certificate {cert}")
    return key_pem, Path(cert).read_bytes()


def server_credentials(cert: StrPath, key: StrPath, ca: StrPath) -> grpc.ServerCredentials:
    """Server credentials that *require* a client certificate issued by ``ca``.

    Raises:
        KeyFileError: the key is group/world readable (fix: ``chmod 600``) or does not
            match the certificate.
    """
    key_pem, cert_pem = _load_pair(cert, key)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )


def channel_credentials(cert: StrPath, key: StrPath, ca: StrPath) -> grpc.ChannelCredentials:
    """Client credentials presenting ``cert`` and trusting only ``ca``.

    Raises:
        KeyFileError: as for :func:`server_credentials`.
    """
    key_pem, cert_pem = _load_pair(cert, key)
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes(),
        private_key=key_pem,
        certificate_chain=cert_pem,
    )


# --------------------------------------------------------------------------- server


async def _new_health_servicer() -> Any:
    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    await servicer.set(health.OVERALL_HEALTH, health_pb2.HealthCheckResponse.SERVING)
    return servicer


@asynccontextmanager
async def create_server(
    bind: str,
    files: TLSFiles,
    authenticator: Authenticator,
    *,
    handlers: Sequence[grpc.GenericRpcHandler] = (),  # type: ignore[type-arg]
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),  # type: ignore[type-arg]
    health_servicer: Any = None,
    options: Sequence[tuple[str, Any]] = (),
    grace: float = 2.0,
    wall_clock: WallClock = system_now,
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[tuple[grpc.aio.Server, int]]:
    """Run an mTLS ``grpc.aio`` server; yields ``(server, port)``.

    Every RPC, the standard health service (``grpc.health.v1.Health``) included, goes
    through an :class:`AuthInterceptor` first, then ``interceptors``. Before binding, the
    server checks its own certificate the way it checks callers, so a peer with an expired,
    revoked or unlisted certificate fails at start with a clear error instead of being
    unreachable. On exit the health status turns NOT_SERVING and the server stops with
    ``grace`` seconds for in-flight RPCs.

    Args:
        bind: ``host:port``; ``127.0.0.1:0`` picks a free port (tests).
        files: this peer's certificate and key, and the CA certificate.
        authenticator: the trust state used for every caller.
        handlers: the services to serve (generic handlers).
        health_servicer: a ``grpc_health.v1.health.aio.HealthServicer`` to control the
            status yourself; by default one reporting SERVING is created.
        options: extra server options, appended to :data:`SERVER_OPTIONS`.
        wall_clock: the time the ``Clock`` service answers (peer/tls/_clock.py; tests
            inject a skewed one).
        credentials: what the server presents, e.g. a :class:`peer.tls.ServerIdentity`'s
            credentials that follow a renewal live; by default ``files`` are read once.

    Raises:
        CertificateRejectedError: this server's own certificate fails the check.
        IdentityError: it is an operator certificate, which may not run a peer.
        KeyFileError: unsafe or mismatched key file.
        OSError: the address cannot be bound.
    """
    own = authenticator.authenticate(load_certificate(files.cert))
    if own.role is not Role.PEER:
        raise IdentityError(
            f"{own.peer_id} holds an {own.role.value} certificate, which may propose sessions "
            "but cannot run a peer server"
        )
    if credentials is None:
        credentials = server_credentials(files.cert, files.key, files.ca)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(authenticator), *interceptors],
        options=[*SERVER_OPTIONS, *options],
    )
    if health_servicer is None:
        health_servicer = await _new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((clock_handler(wall_clock), *handlers))
    try:
        try:
            port = server.add_secure_port(bind, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {bind}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {bind} (address in use or not local?)")
        await server.start()
        logger.info(
            "peer %s (%s) serving mTLS gRPC on %s (port %d)",
            own.peer_id,
            own.institution,
            bind,
            port,
        )
        yield server, port
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace)


# --------------------------------------------------------------------------- client


def secure_channel(
    target: str,
    files: TLSFiles,
    *,
    server_name: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An mTLS channel to ``target`` (``host:port``) using :data:`CHANNEL_OPTIONS`.

    Args:
        server_name: if given, the name the server certificate must carry instead of the
            host in ``target`` (``grpc.ssl_target_name_override``; also sent as SNI).
    """
    all_options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS, *options]
    if server_name is not None:
        all_options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(
        target, channel_credentials(files.cert, files.key, files.ca), options=all_options
    )


def peer_channel(
    roster: Roster,
    peer_id: str,
    files: TLSFiles,
    *,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An mTLS channel to roster member ``peer_id`` at its roster address.

    The TLS layer checks the server certificate carries ``peer_id``'s reserved identity
    hostname, so the channel only ever talks to that member, whatever the address resolves to.

    Raises:
        KeyError: ``peer_id`` is not in the roster or runs no server (an operator).
    """
    entry = roster[peer_id]
    if entry.address is None:
        if entry.role is Role.PEER:
            raise KeyError(
                f"{peer_id!r} is an outbound-only peer (no address in the roster): it is "
                "reached through a relay (peer/relay.py), never dialled"
            )
        raise KeyError(f"{peer_id!r} is an {entry.role.value} and runs no peer server")
    return secure_channel(
        entry.address,
        files,
        server_name=identity_hostname(roster.federation, entry.role, peer_id),
        options=options,
    )


async def check_peer(
    channel: grpc.aio.Channel,
    *,
    target: str,
    peer: str | None = None,
    timeout: float = 5.0,
    attempts: int = 3,
    retry_delay: float = 0.5,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> None:
    """Ask the peer's health service whether it is serving; bounded, never retries forever.

    Only errors that may go away (unreachable, timeout, not serving yet) are retried, at
    most ``attempts`` times in all, waiting ``retry_delay * attempt`` seconds in between;
    a handshake failure or a rejection is raised at once.

    Raises:
        TransportError: the mapped error of the last attempt.
    """
    wait = sleep or asyncio.sleep
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for attempt in range(1, attempts + 1):
        try:
            response = await check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            error = map_rpc_error(exc, target=target, peer=peer)
        else:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            error = PeerNotServingError(
                f"peer {peer or target} answers but is {status}", target=target, peer=peer
            )
        if not error.retryable or attempt == attempts:
            raise error
        await wait(retry_delay * attempt)
