"""The CA ceremony: root CA, on-site key + CSR, CSR signing."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from peer.identity._errors import CAError, CSRError, InvalidNameError, KeyFileError
from peer.identity._files import (
    StrPath,
    certificate_pem,
    generate_key,
    load_certificate,
    make_private_dir,
    write_private_key,
    write_public_file,
)
from peer.identity._names import (
    Clock,
    Role,
    aware,
    ca_uri,
    identity_hostname,
    identity_uri,
    split_hosts,
    system_clock,
    validate_federation,
    validate_hostname,
    validate_institution,
    validate_ip,
    validate_peer_id,
)
from peer.identity._revocation import issue_crl
from peer.identity._store import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    ISSUED_DIR,
    CAInfo,
    OpenCA,
    ca_info,
    open_ca,
)
from peer.identity._x509 import read_identity

DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 397

# Certificates start a few minutes in the past so that a peer whose clock is slightly
# behind the CA's does not see a brand-new certificate as "not yet valid".
CLOCK_SKEW = timedelta(minutes=5)


def init_ca(
    directory: StrPath,
    federation: str,
    common_name: str,
    validity_days: int = DEFAULT_CA_DAYS,
    clock: Clock = system_clock,
) -> CAInfo:
    """Create a federation's root CA in ``directory`` (created 0700 if missing).

    Writes ``ca.key`` (ECDSA P-256, mode 0600), the self-signed ``ca.pem`` (CA:TRUE,
    pathlen 0, keyCertSign + cRLSign, URI SAN ``urn:<federation>:ca``), an empty signed
    ``crl.pem`` and an ``issued/`` directory where every signed certificate is kept.

    Returns:
        The CA's description; read ``.fingerprint`` out to every hospital.

    Raises:
        InvalidNameError: bad federation or common name.
        KeyFileError: a CA key already exists in ``directory``.
    """
    validate_federation(federation)
    validate_institution(common_name, what="CA common name")
    if validity_days < 1:
        raise ValueError(f"validity_days must be positive, got {validity_days}")
    root = make_private_dir(directory)
    if (root / CA_CERT_FILE).exists():
        raise CAError(f"{root} already holds a CA ({root / CA_CERT_FILE}); refusing to replace it")
    key = generate_key()
    write_private_key(root / CA_KEY_FILE, key)
    now = aware(clock(), "clock()")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
        ]
    )
    public_key = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ca_uri(federation))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_public_file(root / CA_CERT_FILE, certificate_pem(cert))
    (root / ISSUED_DIR).mkdir(mode=0o700, exist_ok=True)
    info = ca_info(root)
    issue_crl(OpenCA(info, key), [], number=1, now=now)
    return info


@dataclass(frozen=True, slots=True)
class RequestPaths:
    """What :func:`create_request` wrote: the private key stays on site, the CSR travels."""

    key: Path
    csr: Path


def create_request(
    directory: StrPath,
    peer_id: str,
    institution: str,
    federation: str,
    hostnames: Iterable[str] = (),
    ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    role: Role = Role.PEER,
    *,
    renew: bool = False,
) -> RequestPaths:
    """Generate this institution's key on site and a CSR for the consortium CA.

    With ``renew``, the request renews the identity whose key ``<peer_id>.key`` is already
    in ``directory``: a **new** key is generated, as ``<peer_id>.next.key`` (with
    ``<peer_id>.next.csr``), and the current key stays in use until the renewed certificate
    is installed (see SECURITY.md, "Certificate renewal"). A new key rather than the same
    one: whatever may have exposed the old key over its lifetime (backups, a copied kit)
    does not carry over, and the old key can be revoked without touching the new one.

    Writes ``<directory>/<peer_id>.key`` (ECDSA P-256, created with mode 0600 and never
    overwritten) and ``<directory>/<peer_id>.csr`` with CN=peer_id, O=institution and SANs:
    a DNS SAN per hostname, an IP address SAN per IP (in ``ips``, or an IP literal given
    in ``hostnames``) and the URI ``urn:<federation>:<role>:<peer_id>``.

    Raises:
        InvalidNameError: an invalid peer id, institution, federation, hostname or IP.
        KeyFileError: the key file already exists; with ``renew``, there is no current key.
    """
    validate_peer_id(peer_id)
    validate_institution(institution)
    validate_federation(federation)
    role = Role(role)
    # An IP address given as a hostname goes into an IP SAN, where TLS clients look for it.
    dns, addresses = split_hosts(hostnames)
    addresses += [validate_ip(ip) for ip in ips]
    dns, addresses = list(dict.fromkeys(dns)), list(dict.fromkeys(addresses))
    root = make_private_dir(directory)
    stem = peer_id
    if renew:
        if not (root / f"{peer_id}.key").exists():
            raise KeyFileError(
                f"nothing to renew: {root / f'{peer_id}.key'} does not exist (a first "
                "request is made without --renew)"
            )
        stem = f"{peer_id}.next"
    key_path = root / f"{stem}.key"
    csr_path = root / f"{stem}.csr"
    key = generate_key()
    write_private_key(key_path, key)
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    names += [x509.IPAddress(ip) for ip in addresses]
    names.append(x509.UniformResourceIdentifier(identity_uri(federation, role, peer_id)))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, peer_id),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, institution),
                ]
            )
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_public_file(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return RequestPaths(key=key_path, csr=csr_path)


def _load_csr(csr_path: StrPath) -> x509.CertificateSigningRequest:
    try:
        data = Path(csr_path).read_bytes()
    except FileNotFoundError:
        raise CSRError(f"CSR file {csr_path} does not exist") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError as exc:
        raise CSRError(f"{csr_path} is not a certificate signing request: {exc}") from None


def sign_request(
    ca_dir: StrPath,
    csr_path: StrPath,
    out_path: StrPath,
    validity_days: int = DEFAULT_CERT_DAYS,
    clock: Clock = system_clock,
    role: Role = Role.PEER,
) -> x509.Certificate:
    """Check a CSR and issue the institution's certificate.

    The CA verifies the CSR's self-signature, that its key is ECDSA P-256, that its URI SAN
    names this CA's federation and the ``role`` being granted, that CN equals the id in that
    URI, and that every DNS/IP SAN is well formed. The certificate gets: subject CN + O only,
    the CSR's DNS/IP SANs plus the reserved identity hostname
    (:func:`~peer.identity.identity_hostname`) and the URI SAN, basicConstraints CA:FALSE,
    keyUsage digitalSignature, extendedKeyUsage serverAuth + clientAuth. A copy is kept in
    ``ca_dir/issued/<SERIAL>.pem``.

    Args:
        role: what the certificate is for; must match the role the CSR asks for, so that
            an operator certificate is never issued by accident (or vice versa).

    Returns:
        The issued certificate (also written to ``out_path``).

    Raises:
        CSRError: with the reason, e.g. "CSR is for federation X, this CA is for Y".
    """
    ca = open_ca(ca_dir)
    csr = _load_csr(csr_path)
    if not csr.is_signature_valid:
        raise CSRError(f"{csr_path}: the CSR's signature does not verify (corrupted or forged)")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP256R1
    ):
        raise CSRError(f"{csr_path}: the CSR key must be ECDSA P-256")
    try:
        identity = read_identity(csr)
    except ValueError as exc:
        raise CSRError(f"{csr_path}: {exc}") from None
    if identity.federation != ca.info.federation:
        raise CSRError(
            f"CSR is for federation {identity.federation!r}, "
            f"this CA is for {ca.info.federation!r} ({csr_path})"
        )
    if identity.role != Role(role):
        raise CSRError(
            f"CSR of {identity.peer_id!r} asks for role {identity.role.value!r}, but it is being "
            f"signed as {Role(role).value!r}; pass role={identity.role.value!r} if that is intended"
        )
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    try:
        dns = [validate_hostname(name) for name in san.get_values_for_type(x509.DNSName)]
    except InvalidNameError as exc:
        raise CSRError(f"{csr_path}: {exc}") from None
    ips = san.get_values_for_type(x509.IPAddress)
    unexpected = [
        name
        for name in san
        if not isinstance(name, x509.DNSName | x509.IPAddress | x509.UniformResourceIdentifier)
    ]
    if unexpected:
        raise CSRError(f"{csr_path}: unsupported subject alternative names {unexpected}")

    now = aware(clock(), "clock()")
    if validity_days < 1:
        raise ValueError(f"validity_days must be positive, got {validity_days}")
    not_after = now + timedelta(days=validity_days)
    ca_not_after = ca.info.certificate.not_valid_after_utc
    if not_after > ca_not_after:
        raise CSRError(
            f"a {validity_days}-day certificate would outlive the CA certificate, which expires "
            f"{ca_not_after.isoformat()}; ask for fewer days or renew the CA"
        )
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    names.append(
        x509.DNSName(identity_hostname(identity.federation, identity.role, identity.peer_id))
    )
    names += [x509.IPAddress(ip) for ip in ips]
    names.append(
        x509.UniformResourceIdentifier(
            identity_uri(identity.federation, identity.role, identity.peer_id)
        )
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, identity.peer_id),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, identity.institution),
                ]
            )
        )
        .issuer_name(ca.info.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    pem = certificate_pem(cert)
    ca.info.issued_dir.mkdir(mode=0o700, exist_ok=True)
    write_public_file(ca.info.issued_dir / f"{cert.serial_number:X}.pem", pem)
    write_public_file(out_path, pem)
    return cert


def issued_certificates(ca_dir: StrPath) -> list[x509.Certificate]:
    """Every certificate this CA has issued, oldest first (for listing and revoking)."""
    info = ca_info(ca_dir)
    certs = [load_certificate(path) for path in sorted(info.issued_dir.glob("*.pem"))]
    return sorted(certs, key=lambda cert: cert.not_valid_before_utc)
