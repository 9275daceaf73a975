"""Reading our identity conventions back out of X.509 certificates."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from peer.identity._errors import InvalidNameError
from peer.identity._names import Role, parse_identity_uri, validate_federation


@dataclass(frozen=True, slots=True)
class CertIdentity:
    """The identity fields of a peer or operator certificate (not yet checked for trust)."""

    federation: str
    role: Role
    peer_id: str
    institution: str


def single_attribute(name: x509.Name, oid: x509.ObjectIdentifier, what: str) -> str:
    """The one string value of ``oid`` in ``name``; ValueError if absent or repeated."""
    values = name.get_attributes_for_oid(oid)
    if len(values) != 1:
        raise ValueError(f"expected exactly one {what} in {name.rfc4514_string()!r}")
    value = values[0].value
    return value if isinstance(value, str) else value.decode("utf-8")


def uris(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The URI SANs of a certificate or CSR (empty if it has no SAN extension)."""
    try:
        san = cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return san.value.get_values_for_type(x509.UniformResourceIdentifier)


def read_identity(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> CertIdentity:
    """Read federation, role and id from the URI SAN, institution from O, and check CN == id.

    Raises:
        ValueError: (an :class:`InvalidNameError` for bad names) saying what is missing or
            inconsistent. Callers turn it into their own error class.
    """
    identity_uris = [u for u in uris(cert_or_csr) if u.startswith("urn:")]
    if len(identity_uris) != 1:
        raise ValueError(
            f"expected exactly one urn:<federation>:<role>:<id> URI SAN, found {identity_uris}"
        )
    federation, role, peer_id = parse_identity_uri(identity_uris[0])
    common_name = single_attribute(cert_or_csr.subject, NameOID.COMMON_NAME, "common name (CN)")
    if common_name != peer_id:
        raise InvalidNameError(
            f"common name CN={common_name!r} does not match the id {peer_id!r} "
            f"in the URI SAN {identity_uris[0]!r}"
        )
    institution = single_attribute(
        cert_or_csr.subject, NameOID.ORGANIZATION_NAME, "organization (O)"
    )
    return CertIdentity(federation, role, peer_id, institution)


def ca_federation(ca_cert: x509.Certificate) -> str:
    """The federation a root CA certificate serves, from its ``urn:<federation>:ca`` URI SAN.

    Raises:
        ValueError: if the certificate is not one of our CA certificates.
    """
    ca_uris = [u for u in uris(ca_cert) if u.startswith("urn:") and u.endswith(":ca")]
    if len(ca_uris) != 1:
        raise ValueError(
            f"certificate {ca_cert.subject.rfc4514_string()!r} is not a federation CA "
            "certificate (no urn:<federation>:ca URI SAN)"
        )
    return validate_federation(ca_uris[0][len("urn:") : -len(":ca")])


def is_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if ``ca_cert``'s key signed ``cert`` and the issuer name matches."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_ca_certificate(cert: x509.Certificate) -> bool:
    """True if ``cert`` has basicConstraints CA=TRUE."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
