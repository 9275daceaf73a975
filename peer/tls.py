"""Mutual-TLS gRPC transport (``grpc.aio``): credentials, caller authentication, servers,
channels, and one mapping of transport failures to clear errors.

Theory of operation
-------------------
Two layers check every connection, and a caller must pass both:

1. **TLS (BoringSSL inside grpcio).** The server is created with
   ``ssl_server_credentials(require_client_auth=True)`` and the consortium CA as its only
   root, so the handshake fails unless the client presents a certificate that chains to our
   CA and is within its validity period *by the host's wall clock*. Clients trust only the
   same CA. gRPC's TLS stack accepts TLS 1.3 (preferred; what two peers from this package
   negotiate) and TLS 1.2 with ECDHE + AES-GCM suites only; TLS 1.0/1.1 and CBC or
   ChaCha20 suites under TLS 1.2 are refused (tests/test_tls.py checks this with a plain
   ``ssl`` client). These are grpc core defaults: the Python API exposes no knobs, so
   nothing is configured here. The negotiated version is in the auth context
   (``ssl_tls_version``) and is logged with every caller.

2. **The roster (this module).** For every RPC, :class:`AuthInterceptor` reads the caller's
   certificate (``auth_context()["x509_pem_cert"]``; not ``peer_identities()``, which are the
   SANs rather than the CN) and runs :func:`peer.identity.check_peer_certificate` with the
   injected clock, the signed roster and the signed CRL. Failures end the RPC with
   ``UNAUTHENTICATED`` (who are you?) or ``PERMISSION_DENIED`` (not allowed) and a
   details string naming the caller and the reason.

In ``grpc.aio`` a server interceptor only sees the method name and metadata, never the
``ServicerContext`` (so no ``auth_context``). The interceptor therefore *wraps the handler*:
it asks the rest of the chain for the ``RpcMethodHandler`` and returns a copy whose behaviour
first authenticates the context, then calls the original. Each RPC runs in its own asyncio
task, so the identity is put in a :class:`contextvars.ContextVar` that handlers read with
:func:`caller_identity`; it cannot leak into another RPC.

What TLS rejects never reaches the interceptor: a client without a certificate, with an
expired one or with one from another CA sees ``UNAVAILABLE`` (with TLS 1.3 the server
verifies the client certificate after the client considers the handshake done, so the client
only sees "Socket closed"). :func:`map_rpc_error` turns that into a
:class:`HandshakeError` that says so, and :func:`check_peer` never retries it. The server's
log (grpc core) says exactly why the handshake failed.

Clients reach a peer through :func:`peer_channel`, which sets ``grpc.ssl_target_name_override``
to the peer's reserved identity hostname (see :func:`peer.identity.identity_hostname`): the TLS
layer then checks that the server is exactly the roster member we meant to call, whatever
address or IP we dialled. Limitation: grpcio offers no client-side hook to inspect the
server certificate, so a client does not check the *server's* certificate against the CRL;
revocation is enforced on every server, and protocol messages are signed and verified
against the roster anyway.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
from cryptography import x509
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from peer.identity import (
    AuthenticationError,
    AuthorizationError,
    CertificateRejectedError,
    Clock,
    CRLError,
    IdentityError,
    KeyFileError,
    PeerIdentity,
    RevocationList,
    Role,
    Roster,
    RosterError,
    check_peer_certificate,
    fingerprint,
    identity_hostname,
    load_certificate,
    load_crl,
    load_private_key,
    load_roster,
    read_private_key_pem,
    system_clock,
)
from peer.identity._files import StrPath

__all__ = [
    "CHANNEL_OPTIONS",
    "SERVER_OPTIONS",
    "AuthInterceptor",
    "Authenticator",
    "HandshakeError",
    "PeerNotServingError",
    "PeerRejectedError",
    "PeerTimeoutError",
    "PeerUnreachableError",
    "TLSFiles",
    "TransportError",
    "caller_identity",
    "channel_credentials",
    "check_peer",
    "create_server",
    "map_rpc_error",
    "peer_channel",
    "secure_channel",
    "server_credentials",
    "status_for",
]

logger = logging.getLogger(__name__)

# Keepalive: peers hold long bidirectional streams across hospital firewalls and NATs that
# drop idle TCP connections, so both sides ping. The server must accept the client's ping
# rate (min_ping_interval <= client keepalive_time), or it answers with GOAWAY
# "too_many_pings".
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # grpc sets SO_REUSEPORT by default: a second peer started on the same port would then
    # silently share it. Fail loudly instead.
    ("grpc.so_reuseport", 0),
)
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
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


# --------------------------------------------------------------------------- authentication


class Authenticator:
    """The trust state a server uses: CA certificate, roster, CRL and clock.

    The roster and CRL can be replaced while the server runs (:meth:`update`); a replacement
    must not be older than the one in use, so an attacker cannot roll back a revocation or
    a removal from the roster by feeding an old signed file.
    """

    def __init__(
        self,
        ca_cert: x509.Certificate,
        roster: Roster,
        crl: RevocationList,
        clock: Clock = system_clock,
    ) -> None:
        if roster.ca_fingerprint != fingerprint(ca_cert):
            raise RosterError(
                f"roster version {roster.version} was verified against CA "
                f"{roster.ca_fingerprint}, not {fingerprint(ca_cert)}"
            )
        self._ca_cert = ca_cert
        self._roster = roster
        self._crl = crl
        self._clock = clock

    @classmethod
    def from_files(
        cls, ca: StrPath, roster: StrPath, crl: StrPath, clock: Clock = system_clock
    ) -> Authenticator:
        """Load and verify the CA certificate, the signed roster and the signed CRL.

        Raises:
            RosterError, CRLError: unsigned, tampered or foreign files.
        """
        ca_cert = load_certificate(ca)
        return cls(ca_cert, load_roster(roster, ca_cert), load_crl(crl, ca_cert), clock)

    @property
    def ca_certificate(self) -> x509.Certificate:
        return self._ca_cert

    @property
    def roster(self) -> Roster:
        return self._roster

    @property
    def crl(self) -> RevocationList:
        return self._crl

    def update(self, *, roster: Roster | None = None, crl: RevocationList | None = None) -> None:
        """Install a newer roster and/or CRL (both already verified against our CA).

        Raises:
            RosterError: the roster is older than the one in use or from another CA.
            CRLError: the CRL number is lower than the one in use.
        """
        if roster is not None:
            if roster.ca_fingerprint != fingerprint(self._ca_cert):
                raise RosterError(f"roster version {roster.version} is from another CA")
            if roster.version < self._roster.version:
                raise RosterError(
                    f"refusing roster version {roster.version}: version "
                    f"{self._roster.version} is already in use (rollback?)"
                )
        if crl is not None and crl.number < self._crl.number:
            raise CRLError(
                f"refusing CRL number {crl.number}: number {self._crl.number} is already in use"
            )
        if roster is not None:
            self._roster = roster
        if crl is not None:
            self._crl = crl

    def authenticate(self, cert: bytes | x509.Certificate) -> PeerIdentity:
        """:func:`peer.identity.check_peer_certificate` against the current state and clock."""
        return check_peer_certificate(cert, self._ca_cert, self._roster, self._crl, self._clock())


def status_for(error: IdentityError) -> grpc.StatusCode:
    """The gRPC status code for an authentication failure (the one place this is decided)."""
    if isinstance(error, AuthenticationError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, AuthorizationError):
        return grpc.StatusCode.PERMISSION_DENIED
    # Our own trust state is unusable (e.g. stale CRL): not the caller's fault, and no
    # caller can be served until an operator fixes it.
    return grpc.StatusCode.UNAVAILABLE


_caller: contextvars.ContextVar[PeerIdentity] = contextvars.ContextVar("peer_tls_caller")


def caller_identity() -> PeerIdentity:
    """The authenticated caller of the RPC being handled.

    Raises:
        RuntimeError: when called outside a handler wrapped by :class:`AuthInterceptor`.
    """
    try:
        return _caller.get()
    except LookupError:
        raise RuntimeError(
            "caller_identity() called outside an RPC authenticated by AuthInterceptor"
        ) from None


Behaviour = Callable[..., Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Authenticates the caller of every RPC; see the module docstring for how and why.

    Args:
        authenticator: the trust state (CA, roster, CRL, clock).
        roles: the roles allowed to call at all (both by default; handlers that must only
            serve peers check ``caller_identity().role``).
    """

    def __init__(
        self,
        authenticator: Authenticator,
        roles: frozenset[Role] = frozenset(Role),
    ) -> None:
        self._authenticator = authenticator
        self._roles = roles

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],  # type: ignore[type-arg]
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
        handler = await continuation(handler_call_details)
        if handler is None:
            # Unknown method: let gRPC answer UNIMPLEMENTED.
            return handler
        return _wrap_handler(handler, handler_call_details.method, self._authenticate)

    async def _authenticate(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> None:
        """Authenticate ``context``'s caller and publish it, or abort the RPC."""
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert", ()))
        if not pems:
            logger.warning("refused %s from %s: no client certificate", method, context.peer())
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "no client certificate: this peer only serves mutually authenticated TLS",
            )
        try:
            identity = self._authenticator.authenticate(pems[0])
        except IdentityError as exc:
            claimed = exc.peer_id if isinstance(exc, CertificateRejectedError) else None
            logger.warning(
                "refused %s from %s (claims %s): %s",
                method,
                context.peer(),
                claimed or "unknown id",
                exc,
            )
            await context.abort(status_for(exc), f"{type(exc).__name__}: {exc}")
        if identity.role not in self._roles:
            allowed = ", ".join(sorted(role.value for role in self._roles))
            logger.warning("refused %s from %s: role %s", method, identity, identity.role)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity.peer_id} has role {identity.role.value}; this service accepts "
                f"only: {allowed}",
            )
        tls_version = b"".join(auth.get("ssl_tls_version", ())).decode() or "TLS"
        # Debug, not info: operators poll Status every half second.
        logger.debug(
            "%s called by %s from %s over %s", method, identity, context.peer(), tls_version
        )
        # Each RPC runs in its own asyncio task (with a copy of the context), so the value
        # set here is seen by this RPC's handler only and disappears with the task.
        _caller.set(identity)


Authenticate = Callable[[Any, str], Awaitable[None]]


def _wrap_handler(
    handler: grpc.RpcMethodHandler,  # type: ignore[type-arg]
    method: str,
    authenticate: Authenticate,
) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    """A copy of ``handler`` whose behaviour authenticates the caller first."""
    if handler.request_streaming and handler.response_streaming:
        factory, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        factory, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        factory, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        factory, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    assert behaviour is not None
    return factory(
        _wrap_behaviour(cast(Behaviour, behaviour), method, authenticate),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap_behaviour(behaviour: Behaviour, method: str, authenticate: Authenticate) -> Behaviour:
    """Wrap one behaviour, preserving its kind, which grpc.aio inspects to drive it.

    An async generator streams what it yields; a coroutine returns the (unary) response or,
    for streaming responses, writes with ``context.write``; a plain function or generator
    is a synchronous handler, which the wrapper runs on the event loop thread (so keep such
    handlers quick: peer services should be ``async``).
    """
    if inspect.isasyncgenfunction(behaviour):

        async def stream_async(request: Any, context: Any) -> AsyncIterator[Any]:
            await authenticate(context, method)
            async for item in behaviour(request, context):
                yield item

        return stream_async
    if inspect.isgeneratorfunction(behaviour):

        async def stream_sync(request: Any, context: Any) -> AsyncIterator[Any]:
            await authenticate(context, method)
            for item in behaviour(request, context):
                yield item

        return stream_sync

    async def call(request: Any, context: Any) -> Any:
        await authenticate(context, method)
        result = behaviour(request, context)
        return await result if inspect.isawaitable(result) else result

    return call


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
    credentials = server_credentials(files.cert, files.key, files.ca)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(authenticator), *interceptors],
        options=[*SERVER_OPTIONS, *options],
    )
    if health_servicer is None:
        health_servicer = await _new_health_servicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if handlers:
        server.add_generic_rpc_handlers(tuple(handlers))
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
        raise KeyError(f"{peer_id!r} is an {entry.role.value} and runs no peer server")
    return secure_channel(
        entry.address,
        files,
        server_name=identity_hostname(roster.federation, entry.role, peer_id),
        options=options,
    )


class TransportError(Exception):
    """A call to another peer failed; the message says which peer, where, and why.

    ::

        TransportError
         ├── PeerUnreachableError   nothing accepted the TCP connection (retryable)
         ├── HandshakeError         TLS failed: a certificate was not accepted (not retried)
         ├── PeerRejectedError      the peer's interceptor refused our certificate
         ├── PeerTimeoutError       the deadline passed
         └── PeerNotServingError    the peer answered that it is not serving

    Attributes:
        target: the address dialled. peer: the peer id meant, if known.
        code, details: the underlying gRPC status, when there is one.
        retryable: whether trying again later may help.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        target: str,
        peer: str | None,
        code: grpc.StatusCode | None = None,
        details: str = "",
    ) -> None:
        super().__init__(message)
        self.target = target
        self.peer = peer
        self.code = code
        self.details = details


class PeerUnreachableError(TransportError):
    retryable = True


class HandshakeError(TransportError):
    pass


class PeerRejectedError(TransportError):
    pass


class PeerTimeoutError(TransportError):
    retryable = True


class PeerNotServingError(TransportError):
    retryable = True


_UNREACHABLE_MARKERS = (
    "connection refused",
    "no route to host",
    "network is unreachable",
    "dns resolution failed",
    "name resolution",
    "connection reset",
    "connect failed",
    "timeout occurred",
)
_HANDSHAKE_MARKERS = ("socket closed", "handshake", "ssl", "tsi_", "certificate", "verification")


def map_rpc_error(error: grpc.RpcError, *, target: str, peer: str | None = None) -> TransportError:
    """Translate a failed call into a :class:`TransportError` (the one place this is done)."""
    code: grpc.StatusCode | None = None
    details = ""
    if isinstance(error, grpc.aio.AioRpcError | grpc.Call):
        code, details = error.code(), error.details() or ""
    who = f"peer {peer} at {target}" if peer else target
    lowered = details.lower()
    kwargs: dict[str, Any] = {"target": target, "peer": peer, "code": code, "details": details}
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return PeerRejectedError(f"{who} refused our certificate: {details}", **kwargs)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return PeerTimeoutError(f"{who} did not answer before the deadline", **kwargs)
    if code is grpc.StatusCode.UNAVAILABLE:
        if "hostname verification" in lowered:
            return HandshakeError(
                f"the server at {target} is not {peer or 'the expected peer'}: its certificate "
                f"does not carry the expected identity ({details})",
                **kwargs,
            )
        if any(marker in lowered for marker in _UNREACHABLE_MARKERS):
            return PeerUnreachableError(f"cannot connect to {who}: {details}", **kwargs)
        if any(marker in lowered for marker in _HANDSHAKE_MARKERS):
            return HandshakeError(
                f"TLS handshake with {who} failed (the connection was closed during or right "
                "after the handshake). Most likely it did not accept our certificate: none "
                "presented, expired, or issued by another CA; or we did not accept its "
                f"certificate. Its log states the reason. gRPC said: {details}",
                **kwargs,
            )
        return PeerUnreachableError(f"{who} is unavailable: {details}", **kwargs)
    name = code.name if code is not None else "unknown status"
    return TransportError(f"call to {who} failed with {name}: {details}", **kwargs)


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
