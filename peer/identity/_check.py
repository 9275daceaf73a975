"""The one decision: may the holder of this certificate talk to us, and who is it?"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peer.identity._errors import (
    CertificateExpiredError,
    FingerprintMismatchError,
    MalformedCertificateError,
    NotInRosterError,
    RevokedCertificateError,
    StaleCRLError,
    UnknownCAError,
    WrongFederationError,
)
from peer.identity._files import StrPath, load_private_key, parse_certificate
from peer.identity._names import Role, aware, fingerprint
from peer.identity._revocation import RevocationList, revocation_reason
from peer.identity._roster import Roster
from peer.identity._x509 import ca_federation, is_ca_certificate, is_issued_by, read_identity
from secagg.crypto import Signer, Verifier, signer_from_private_key, verifier_from_public_key


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who a caller is, once :func:`check_peer_certificate` has accepted its certificate."""

    peer_id: str
    institution: str
    role: Role
    fingerprint: str
    serial_number: int
    not_valid_after: datetime

    def __str__(self) -> str:
        return f"{self.peer_id} ({self.institution}, {self.role.value})"


def check_peer_certificate(
    cert: bytes | x509.Certificate,
    ca_cert: x509.Certificate,
    roster: Roster,
    crl: RevocationList,
    now: datetime,
) -> PeerIdentity:
    """Decide whether ``cert`` identifies a current member of our federation.

    Checks, in this order (the first failure is reported): it parses; it is not a CA
    certificate; ``ca_cert`` issued it (name and signature); ``now`` is within its validity
    period; its URI SAN names our federation; CN equals the id in the URI SAN; the CRL is
    not stale and does not list its serial; the roster lists that id with exactly this
    certificate's fingerprint and role.

    Args:
        cert: the caller's certificate, PEM or DER bytes (gRPC gives PEM) or parsed.
        ca_cert: our federation's root CA certificate.
        roster: the verified roster in use.
        crl: the verified revocation list in use.
        now: the current time (timezone-aware), injected so tests can fix it.

    Returns:
        The caller's identity.

    Raises:
        AuthenticationError: malformed, unknown CA, expired/not yet valid, revoked.
        AuthorizationError: wrong federation, not in roster, fingerprint mismatch.
        StaleCRLError: ``crl`` is past its next-update time (our problem, not the caller's).
    """
    now = aware(now, "now")
    if isinstance(cert, x509.Certificate):
        parsed = cert
    else:
        try:
            parsed = parse_certificate(cert)
        except ValueError as exc:
            raise MalformedCertificateError(f"cannot parse the client certificate: {exc}") from None
    print_ = fingerprint(parsed)
    subject = parsed.subject.rfc4514_string()

    if is_ca_certificate(parsed):
        raise MalformedCertificateError(
            f"certificate {subject!r} is a CA certificate, not a peer certificate",
            fingerprint=print_,
        )
    if not _issued_by(
        parsed.public_bytes(serialization.Encoding.DER),
        ca_cert.public_bytes(serialization.Encoding.DER),
    ):
        raise UnknownCAError(
            f"certificate {subject!r} was issued by {parsed.issuer.rfc4514_string()!r}, which "
            f"is not this federation's CA ({ca_cert.subject.rfc4514_string()!r}, "
            f"{fingerprint(ca_cert)})",
            fingerprint=print_,
        )
    try:
        identity = read_identity(parsed)
    except ValueError as exc:
        raise MalformedCertificateError(
            f"certificate {subject!r}: {exc}", fingerprint=print_
        ) from None
    who = f"{identity.peer_id!r} ({identity.institution})"
    rejected = {"peer_id": identity.peer_id, "fingerprint": print_}

    if now < parsed.not_valid_before_utc:
        raise CertificateExpiredError(
            f"certificate of {who} is not valid until {parsed.not_valid_before_utc.isoformat()} "
            f"(now {now.isoformat()}); check the clocks",
            **rejected,
        )
    if now > parsed.not_valid_after_utc:
        raise CertificateExpiredError(
            f"certificate of {who} expired at {parsed.not_valid_after_utc.isoformat()} "
            f"(now {now.isoformat()}); it must be renewed by the CA",
            **rejected,
        )
    federation = ca_federation(ca_cert)
    if identity.federation != federation:
        raise WrongFederationError(
            f"certificate of {who} is for federation {identity.federation!r}, "
            f"this peer belongs to {federation!r}",
            **rejected,
        )
    if now > crl.next_update:
        raise StaleCRLError(
            f"the revocation list in use (number {crl.number}) expired at "
            f"{crl.next_update.isoformat()}; install a fresh CRL from the CA"
        )
    revoked = crl.revoked(parsed.serial_number)
    if revoked is not None:
        raise RevokedCertificateError(
            f"certificate of {who} (serial {parsed.serial_number:X}) was revoked on "
            f"{revoked.revocation_date_utc.isoformat()} (reason: {revocation_reason(revoked)})",
            **rejected,
        )
    if roster.federation != federation:
        raise WrongFederationError(
            f"the roster in use is for federation {roster.federation!r}, not {federation!r}",
            **rejected,
        )
    entry = roster.get(identity.peer_id)
    if entry is None:
        raise NotInRosterError(
            f"{who} is not in roster version {roster.version} of federation {federation!r}",
            **rejected,
        )
    # The current certificate, or one it renewed that has neither expired nor been revoked
    # (both checked above): the overlap during which a site rolls out its new certificate.
    if print_ not in entry.fingerprints:
        raise FingerprintMismatchError(
            f"certificate of {who} has fingerprint {print_}, but roster version "
            f"{roster.version} lists {entry.cert_fingerprint_sha256} for it (re-issued "
            "certificate? the CA must publish a new roster)",
            **rejected,
        )
    if entry.role is not identity.role:
        raise FingerprintMismatchError(
            f"certificate of {who} has role {identity.role.value!r}, roster says "
            f"{entry.role.value!r}",
            **rejected,
        )
    return PeerIdentity(
        peer_id=identity.peer_id,
        institution=identity.institution,
        role=identity.role,
        fingerprint=print_,
        serial_number=parsed.serial_number,
        not_valid_after=parsed.not_valid_after_utc,
    )


@functools.lru_cache(maxsize=1024)
def _issued_by(cert_der: bytes, ca_der: bytes) -> bool:
    """:func:`is_issued_by`, memoized: the ECDSA verification is most of the cost of a check,
    and every RPC of a long-lived peer presents the same certificate. The answer depends only
    on the two certificates' bytes, so caching it is exact."""
    return is_issued_by(
        x509.load_der_x509_certificate(cert_der), x509.load_der_x509_certificate(ca_der)
    )


def load_signer(key_path: StrPath) -> Signer:
    """A :class:`secagg.crypto.Signer` using this institution's certificate key.

    Raises:
        KeyFileError: the key file is group/world accessible (fix: ``chmod 600``), missing,
            or not an ECDSA key.
    """
    return signer_from_private_key(load_private_key(key_path))


def verifier_for(cert: x509.Certificate) -> Verifier:
    """A :class:`secagg.crypto.Verifier` of signatures by ``cert``'s key."""
    return verifier_from_public_key(cert.public_key())
