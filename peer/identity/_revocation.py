"""Certificate revocation: a CA-signed CRL of revoked serial numbers."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from peer.identity._errors import CAError, CRLError, InvalidNameError
from peer.identity._files import StrPath, load_certificate, write_public_file
from peer.identity._names import Clock, aware, system_clock
from peer.identity._store import OpenCA, ca_info, open_ca
from peer.identity._x509 import is_issued_by

DEFAULT_CRL_DAYS = 90
"""How long a CRL stays usable. Peers refuse to authenticate anyone with a stale CRL, so
the CA must publish a fresh one (``refresh_crl``) before this runs out."""


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A CRL whose signature has been checked against our CA."""

    crl: x509.CertificateRevocationList
    number: int
    last_update: datetime
    next_update: datetime

    def revoked(self, serial_number: int) -> x509.RevokedCertificate | None:
        """The CRL entry for ``serial_number``, or None if it is not revoked."""
        return self.crl.get_revoked_certificate_by_serial_number(serial_number)

    @property
    def serial_numbers(self) -> frozenset[int]:
        return frozenset(entry.serial_number for entry in self.crl)

    def pem(self) -> bytes:
        return self.crl.public_bytes(serialization.Encoding.PEM)


def revocation_reason(entry: x509.RevokedCertificate) -> str:
    """The reason code of a CRL entry as text (``unspecified`` when absent)."""
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
    except x509.ExtensionNotFound:
        return x509.ReasonFlags.unspecified.value


def parse_crl(data: bytes, ca_cert: x509.Certificate, source: str = "CRL") -> RevocationList:
    """Parse a PEM or DER CRL and verify it was signed by ``ca_cert``.

    Raises:
        CRLError: unparseable, issued by another CA, bad signature, or missing fields.
    """
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            crl = x509.load_pem_x509_crl(data)
        else:
            crl = x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise CRLError(f"{source} is not a certificate revocation list: {exc}") from None
    if crl.issuer != ca_cert.subject:
        raise CRLError(
            f"{source} was issued by {crl.issuer.rfc4514_string()!r}, "
            f"not by our CA {ca_cert.subject.rfc4514_string()!r}"
        )
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(
        public_key
    ):
        raise CRLError(f"{source} signature does not verify with our CA key: it was altered")
    if crl.next_update_utc is None:
        raise CRLError(f"{source} has no next-update time; refusing an open-ended CRL")
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        raise CRLError(f"{source} has no CRL number") from None
    return RevocationList(crl, number, crl.last_update_utc, crl.next_update_utc)


def load_crl(path: StrPath, ca_cert: x509.Certificate) -> RevocationList:
    """Load a CRL file and verify its signature against ``ca_cert``.

    Raises:
        CRLError: see :func:`parse_crl`; also if the file is missing.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CRLError(f"revocation list {path} does not exist") from None
    return parse_crl(data, ca_cert, source=f"revocation list {path}")


def issue_crl(
    ca: OpenCA,
    revoked: list[x509.RevokedCertificate],
    number: int,
    now: datetime,
    validity_days: int = DEFAULT_CRL_DAYS,
) -> x509.CertificateRevocationList:
    """Sign and write a CRL listing ``revoked`` as ``ca_dir/crl.pem``."""
    if validity_days < 1:
        raise ValueError(f"CRL validity must be at least 1 day, got {validity_days}")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.info.certificate.subject)
        .last_update(now)
        .next_update(now + timedelta(days=validity_days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca.key, hashes.SHA256())
    write_public_file(ca.info.crl_path, crl.public_bytes(serialization.Encoding.PEM))
    return crl


def _parse_reason(reason: x509.ReasonFlags | str) -> x509.ReasonFlags:
    if isinstance(reason, x509.ReasonFlags):
        return reason
    for flag in x509.ReasonFlags:
        if reason in (flag.value, flag.name):
            return flag
    choices = ", ".join(flag.name for flag in x509.ReasonFlags)
    raise InvalidNameError(f"unknown revocation reason {reason!r}; use one of: {choices}")


def _existing_entries(ca: OpenCA) -> tuple[list[x509.RevokedCertificate], int]:
    if not ca.info.crl_path.exists():
        return [], 0
    current = load_crl(ca.info.crl_path, ca.info.certificate)
    return list(current.crl), current.number


def revoke(
    ca_dir: StrPath,
    serial_or_cert: int | x509.Certificate | StrPath,
    reason: x509.ReasonFlags | str = x509.ReasonFlags.unspecified,
    clock: Clock = system_clock,
    validity_days: int = DEFAULT_CRL_DAYS,
) -> RevocationList:
    """Revoke a certificate and publish a new CRL (``ca_dir/crl.pem``, CRL number + 1).

    Args:
        ca_dir: the CA directory.
        serial_or_cert: a serial number, a certificate, or a certificate file path. A serial
            must be one this CA issued (a copy is kept in ``ca_dir/issued``).
        reason: an ``x509.ReasonFlags`` or its name/value (``key_compromise``,
            ``keyCompromise``, ...).
        clock: the time source for the revocation date and CRL validity.
        validity_days: days until the CRL's next-update time.

    Returns:
        The new, signed revocation list.

    Raises:
        CAError: the serial was not issued by this CA or is already revoked.
    """
    ca = open_ca(ca_dir)
    flag = _parse_reason(reason)
    if isinstance(serial_or_cert, int):
        serial = serial_or_cert
        if not (ca.info.issued_dir / f"{serial:X}.pem").exists():
            raise CAError(
                f"serial {serial:X} was not issued by this CA (not in {ca.info.issued_dir})"
            )
    else:
        cert = (
            serial_or_cert
            if isinstance(serial_or_cert, x509.Certificate)
            else load_certificate(serial_or_cert)
        )
        if not is_issued_by(cert, ca.info.certificate):
            raise CAError(
                f"certificate {cert.subject.rfc4514_string()!r} was not issued by this CA"
            )
        serial = cert.serial_number
    entries, number = _existing_entries(ca)
    for entry in entries:
        if entry.serial_number == serial:
            raise CAError(
                f"serial {serial:X} is already revoked (since "
                f"{entry.revocation_date_utc.isoformat()}, reason {revocation_reason(entry)})"
            )
    now = aware(clock(), "clock()")
    builder = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
    if flag is not x509.ReasonFlags.unspecified:
        # RFC 5280 5.3.1: the reason code is omitted rather than sent as "unspecified".
        builder = builder.add_extension(x509.CRLReason(flag), critical=False)
    entries.append(builder.build())
    crl = issue_crl(ca, entries, number + 1, now, validity_days)
    return parse_crl(crl.public_bytes(serialization.Encoding.PEM), ca.info.certificate)


def refresh_crl(
    ca_dir: StrPath, clock: Clock = system_clock, validity_days: int = DEFAULT_CRL_DAYS
) -> RevocationList:
    """Re-issue the CRL with the same entries and a new next-update time (number + 1)."""
    ca = open_ca(ca_dir)
    entries, number = _existing_entries(ca)
    crl = issue_crl(ca, entries, number + 1, aware(clock(), "clock()"), validity_days)
    return parse_crl(crl.public_bytes(serialization.Encoding.PEM), ca.info.certificate)


def current_crl(ca_dir: StrPath) -> RevocationList:
    """The CA's current CRL, verified."""
    info = ca_info(ca_dir)
    return load_crl(info.crl_path, info.certificate)
