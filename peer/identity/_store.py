"""The CA directory: where the root key, certificate, CRL, issued certificates live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from peer.identity._errors import CAError, KeyFileError
from peer.identity._files import StrPath, load_certificate, load_private_key
from peer.identity._names import fingerprint
from peer.identity._x509 import ca_federation

CA_KEY_FILE = "ca.key"
CA_CERT_FILE = "ca.pem"
CRL_FILE = "crl.pem"
ISSUED_DIR = "issued"
ROSTER_FILE = "roster.json"


@dataclass(frozen=True, slots=True)
class CAInfo:
    """A consortium root CA as seen from its directory (no private key in here).

    Attributes:
        fingerprint: ``SHA256:AB:CD:...`` of the CA certificate, to be read out of band
            to every hospital, which checks it before trusting ``cert_path``.
    """

    directory: Path
    federation: str
    common_name: str
    certificate: x509.Certificate
    fingerprint: str
    cert_path: Path
    key_path: Path
    crl_path: Path

    @property
    def issued_dir(self) -> Path:
        return self.directory / ISSUED_DIR

    @property
    def roster_path(self) -> Path:
        return self.directory / ROSTER_FILE


def ca_info(directory: StrPath) -> CAInfo:
    """Describe the CA in ``directory`` without touching its private key.

    Raises:
        CAError: if the directory holds no CA certificate or it is not a federation CA.
    """
    root = Path(directory)
    cert_path = root / CA_CERT_FILE
    if not cert_path.is_file():
        raise CAError(f"{root} is not a CA directory: {cert_path} is missing (run init_ca)")
    try:
        cert = load_certificate(cert_path)
        federation = ca_federation(cert)
    except ValueError as exc:
        raise CAError(f"{cert_path}: {exc}") from None
    common_names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    common_name = str(common_names[0].value) if common_names else ""
    return CAInfo(
        directory=root,
        federation=federation,
        common_name=common_name,
        certificate=cert,
        fingerprint=fingerprint(cert),
        cert_path=cert_path,
        key_path=root / CA_KEY_FILE,
        crl_path=root / CRL_FILE,
    )


@dataclass(frozen=True, slots=True)
class OpenCA:
    """A CA with its private key loaded: only the CA-side functions use this."""

    info: CAInfo
    key: ec.EllipticCurvePrivateKey


def open_ca(directory: StrPath) -> OpenCA:
    """Load the CA in ``directory`` with its key, checking the key matches the certificate.

    Raises:
        CAError: missing/inconsistent directory.
        KeyFileError: the key file is unsafe or unreadable.
    """
    info = ca_info(directory)
    try:
        key = load_private_key(info.key_path)
    except KeyFileError as exc:
        raise KeyFileError(f"CA key: {exc}") from None
    if key.public_key() != info.certificate.public_key():
        raise CAError(f"{info.key_path} is not the private key of {info.cert_path}")
    return OpenCA(info, key)
