"""Reading and writing key material with safe permissions."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from peer.identity._errors import KeyFileError

StrPath = str | os.PathLike[str]

# Permissions a private key may have beyond the owner's: none.
_UNSAFE_KEY_BITS = stat.S_IRWXG | stat.S_IRWXO


def make_private_dir(directory: StrPath) -> Path:
    """Create ``directory`` (and parents) as 0700 if missing; return it as a Path."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key from the OS CSPRNG (OpenSSL's, via ``cryptography``)."""
    return ec.generate_private_key(ec.SECP256R1())


def write_private_key(path: StrPath, key: ec.EllipticCurvePrivateKey) -> Path:
    """Write ``key`` as unencrypted PKCS#8 PEM into a *new* file created with mode 0600.

    The file is created by ``os.open(..., O_CREAT | O_EXCL, 0o600)`` so it is never readable
    by anyone else, not even for an instant, and an existing key is never overwritten.

    Raises:
        KeyFileError: if the file already exists.
    """
    target = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(
            f"private key {target} already exists; refusing to overwrite it "
            "(move it away first if you really mean to replace it)"
        ) from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
        handle.flush()
        os.fsync(handle.fileno())
    return target


def check_key_permissions(path: StrPath) -> None:
    """Refuse a private key file that group or others can access.

    On non-POSIX systems (no permission bits) this check is skipped.

    Raises:
        KeyFileError: naming the file, its mode, and the ``chmod 600`` that fixes it.
    """
    target = Path(path)
    try:
        mode = target.stat().st_mode
    except FileNotFoundError:
        raise KeyFileError(f"private key {target} does not exist") from None
    if os.name == "posix" and mode & _UNSAFE_KEY_BITS:
        raise KeyFileError(
            f"private key {target} has mode {stat.S_IMODE(mode):04o}: it is accessible by "
            f"group or others. Restrict it to its owner with: chmod 600 {target}"
        )


def read_private_key_pem(path: StrPath) -> bytes:
    """The PEM bytes of a private key file after :func:`check_key_permissions`."""
    check_key_permissions(path)
    return Path(path).read_bytes()


def load_private_key(path: StrPath) -> ec.EllipticCurvePrivateKey:
    """Load an unencrypted ECDSA private key, refusing unsafe permissions.

    Raises:
        KeyFileError: unsafe permissions, missing file, not a PEM key, or not ECDSA.
    """
    pem = read_private_key_pem(path)
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"cannot read private key {path}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(
            f"private key {path} is {type(key).__name__}; only ECDSA P-256 keys are used"
        )
    return key


def write_public_file(path: StrPath, data: bytes) -> Path:
    """Atomically write a public file, mode 0644, creating its directory if needed.

    Atomic (temporary file, then rename) so a reader never sees half a roster or CRL.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def parse_certificate(data: bytes) -> x509.Certificate:
    """Parse a PEM or DER certificate. Raises ``ValueError`` if it is neither."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def load_certificate(path: StrPath) -> x509.Certificate:
    """Load a PEM or DER certificate file. Raises ``ValueError`` naming the file if invalid."""
    try:
        return parse_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise ValueError(f"{path} is not a certificate: {exc}") from None


def certificate_pem(cert: x509.Certificate) -> bytes:
    """The PEM encoding of ``cert``."""
    return cert.public_bytes(serialization.Encoding.PEM)
