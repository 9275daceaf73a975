"""The certificate and key a running server presents, replaceable without a restart.

A renewed certificate (``ceremony request --renew``) must reach the TLS layer of a peer
that is in the middle of a session. gRPC's dynamic server credentials ask a *fetcher* for
the certificate configuration at every new TLS handshake; :class:`ServerIdentity` answers
with the pair installed last (:meth:`ServerIdentity.replace`, called by the peer's reloader
once it has checked the new pair, see peer/reload.py). Connections already open keep the
certificate they were set up with until they close: nothing in flight is cut.
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc

from peer.identity._files import StrPath
from peer.tls._channel import _load_pair

__all__ = ["ServerIdentity"]


class ServerIdentity:
    """The (key, certificate) pair a server presents; see the module docstring.

    Raises (constructor and :meth:`replace`):
        KeyFileError: unsafe key file, or a key that does not belong to the certificate.
    """

    def __init__(self, cert: StrPath, key: StrPath, ca: StrPath) -> None:
        self._ca_pem = Path(ca).read_bytes()
        self._lock = threading.Lock()  # the fetcher runs on gRPC's own threads
        self._pair = _load_pair(cert, key)
        self._version = 0

    def replace(self, cert: StrPath, key: StrPath) -> None:
        """Present ``cert``/``key`` from the next handshake on."""
        pair = _load_pair(cert, key)
        with self._lock:
            self._pair = pair
            self._version += 1

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        with self._lock:
            pair = self._pair
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=self._ca_pem)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate and follow :meth:`replace`."""
        served = [self._version]  # the version this server's credentials last handed out

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            with self._lock:
                if self._version == served[0]:
                    return None  # unchanged: gRPC keeps the configuration it has
                served[0] = self._version
            return self._configuration()

        # grpc documents None as "no change"; its type stubs do not allow it.
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            fetch,  # type: ignore[arg-type]
            require_client_authentication=True,
        )
