"""Who is calling: the :class:`Authenticator` (CA, roster and CRL) and the
:class:`AuthInterceptor` that authenticates the caller of every RPC (see :mod:`peer.tls` for
how and why)."""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import grpc
from cryptography import x509

from peer.identity import (
    AuthenticationError,
    AuthorizationError,
    CertificateRejectedError,
    Clock,
    CRLError,
    IdentityError,
    PeerIdentity,
    RevocationList,
    Role,
    Roster,
    RosterError,
    check_peer_certificate,
    fingerprint,
    load_certificate,
    load_crl,
    load_roster,
    system_clock,
)
from peer.identity._files import StrPath

__all__ = ["AuthInterceptor", "Authenticator", "acting_as", "caller_identity", "status_for"]

# The transport logs under one name, as before it was cut into modules.
logger = logging.getLogger("peer.tls")

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


@contextlib.contextmanager
def acting_as(identity: PeerIdentity) -> Iterator[None]:
    """Handle a call on behalf of ``identity`` without a TLS connection from it: a call an
    outbound-only peer receives through a relay (peer/relay.py), whose author signed it and
    was authenticated against the roster and CRL by that signature."""
    token = _caller.set(identity)
    try:
        yield
    finally:
        _caller.reset(token)


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
