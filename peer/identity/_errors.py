"""The one error tree of :mod:`peer.identity`.

::

    IdentityError
     ├── InvalidNameError              a peer id, federation, hostname or address is not acceptable
     ├── KeyFileError                  a private key file is missing, unsafe (group/world
     │                                 accessible), already present, or unreadable
     ├── CAError                       the CA directory is missing, incomplete or inconsistent
     ├── CSRError                      the CA refuses a certificate signing request
     ├── RosterError                   a roster is unsigned, tampered with, malformed, or for
     │                                 another federation
     ├── CRLError                      a revocation list is not signed by our CA, or is malformed
     │    └── StaleCRLError            ... or is past its next-update time (fail closed)
     └── CertificateRejectedError      check_peer_certificate refused a caller
          ├── AuthenticationError      we cannot establish who the caller is  (UNAUTHENTICATED)
          │    ├── MalformedCertificateError
          │    ├── UnknownCAError
          │    ├── CertificateExpiredError   (also "not yet valid")
          │    └── RevokedCertificateError
          └── AuthorizationError       we know who it is, it may not talk to us (PERMISSION_DENIED)
               ├── WrongFederationError
               ├── NotInRosterError
               └── FingerprintMismatchError

Every message says what was wrong and, where known, names the peer concerned; the gRPC layer
maps the two :class:`CertificateRejectedError` branches to status codes in exactly one place.
"""

from __future__ import annotations


class IdentityError(Exception):
    """Base class of every error raised by :mod:`peer.identity`."""


class InvalidNameError(IdentityError, ValueError):
    """A peer id, federation name, hostname, IP address or network address is invalid."""


class KeyFileError(IdentityError):
    """A private key file cannot be used safely (permissions, existence, format)."""


class CAError(IdentityError):
    """The certificate authority directory cannot be used."""


class CSRError(IdentityError):
    """The CA refuses to sign a certificate signing request."""


class RosterError(IdentityError):
    """A roster cannot be trusted: unsigned, tampered with, malformed or for another CA."""


class CRLError(IdentityError):
    """A certificate revocation list cannot be trusted or used."""


class StaleCRLError(CRLError):
    """The revocation list is past its next-update time: a fresh one must be installed.

    Using a stale list could miss recent revocations, so authentication fails closed.
    """


class CertificateRejectedError(IdentityError):
    """A caller's certificate was refused by :func:`~peer.identity.check_peer_certificate`.

    Attributes:
        peer_id: the identity the certificate claims, when it could be read (else ``None``).
        fingerprint: SHA-256 fingerprint of the refused certificate, when it could be parsed.
    """

    def __init__(
        self, message: str, *, peer_id: str | None = None, fingerprint: str | None = None
    ) -> None:
        super().__init__(message)
        self.peer_id = peer_id
        self.fingerprint = fingerprint


class AuthenticationError(CertificateRejectedError):
    """The caller's identity cannot be established (gRPC ``UNAUTHENTICATED``)."""


class MalformedCertificateError(AuthenticationError):
    """The certificate cannot be parsed or lacks the identity fields we require."""


class UnknownCAError(AuthenticationError):
    """The certificate was not issued by this federation's CA."""


class CertificateExpiredError(AuthenticationError):
    """The certificate is expired or not yet valid at the current time."""


class RevokedCertificateError(AuthenticationError):
    """The certificate's serial number is on the CA's revocation list."""


class AuthorizationError(CertificateRejectedError):
    """The caller is identified but not allowed (gRPC ``PERMISSION_DENIED``)."""


class WrongFederationError(AuthorizationError):
    """The certificate names a different federation than ours."""


class NotInRosterError(AuthorizationError):
    """The peer id is not listed in the roster in use."""


class FingerprintMismatchError(AuthorizationError):
    """The peer id is listed, but with a different certificate."""
