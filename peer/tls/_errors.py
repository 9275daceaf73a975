"""Transport failures: the :class:`TransportError` tree and :func:`map_rpc_error`, the one
place a failed gRPC call becomes a clear error."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = [
    "HandshakeError",
    "PeerNotServingError",
    "PeerRejectedError",
    "PeerTimeoutError",
    "PeerUnreachableError",
    "TransportError",
    "map_rpc_error",
]


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
