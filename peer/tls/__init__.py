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

Where each job lives: :mod:`peer.tls._channel` (options, credentials, the server, client
channels, the health check), :mod:`peer.tls._auth` (the :class:`Authenticator` and the
:class:`AuthInterceptor`), :mod:`peer.tls._errors` (the :class:`TransportError` tree and
:func:`map_rpc_error`). Import everything from ``peer.tls``.
"""

from peer.tls._auth import (
    Authenticator,
    AuthInterceptor,
    acting_as,
    caller_identity,
    status_for,
)
from peer.tls._channel import (
    CHANNEL_OPTIONS,
    SERVER_OPTIONS,
    TLSFiles,
    channel_credentials,
    check_peer,
    create_server,
    peer_channel,
    secure_channel,
    server_credentials,
)
from peer.tls._errors import (
    HandshakeError,
    PeerNotServingError,
    PeerRejectedError,
    PeerTimeoutError,
    PeerUnreachableError,
    TransportError,
    map_rpc_error,
)

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
    "acting_as",
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
