"""The roster: who is in the federation, where to reach them, with which certificate.

On disk a roster is two files: ``roster.json`` (human-readable JSON) and ``roster.json.sig``
(a detached CA signature over the exact bytes of ``roster.json``). The signature covers a
domain-separation label first, so a roster signature can never be confused with any other
use of the CA key.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from peer.identity._errors import CAError, IdentityError, RosterError
from peer.identity._files import (
    StrPath,
    certificate_pem,
    load_certificate,
    parse_certificate,
    write_public_file,
)
from peer.identity._names import (
    Clock,
    Role,
    aware,
    fingerprint,
    normalize_fingerprint,
    system_clock,
    validate_address,
)
from peer.identity._store import ca_info, open_ca
from peer.identity._x509 import ca_federation, is_issued_by, read_identity
from secagg.crypto import Verifier, verifier_from_public_key

ROSTER_FORMAT = "hospital-secagg-roster/1"
SIGNATURE_FORMAT = "hospital-secagg-roster-signature/1"
SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
SIGNATURE_SUFFIX = ".sig"
_SIGNING_LABEL = b"hospital-secagg/roster/v1\x00"


@dataclass(frozen=True, slots=True)
class RosterEntry:
    """One member of the federation.

    Attributes:
        address: ``host:port`` of its peer server; ``None`` for operators, who run no peer,
            and for outbound-only peers (a site whose firewall accepts no inbound
            connection: it takes part over outbound streams only, see :attr:`inbound`).
        certificate: its certificate, so that any peer can verify its protocol signatures
            even without ever connecting to it.
    """

    peer_id: str
    institution: str
    role: Role
    address: str | None
    cert_fingerprint_sha256: str
    certificate: x509.Certificate

    def verifier(self) -> Verifier:
        """A verifier of this member's protocol signatures (its certificate key)."""
        return verifier_from_public_key(self.certificate.public_key())

    @property
    def inbound(self) -> bool:
        """Whether others can dial this member: a peer with an address. A peer without one
        is outbound-only (peer/relay.py): never an aggregator, reached through a relay."""
        return self.role is Role.PEER and self.address is not None


@dataclass(frozen=True, slots=True)
class Roster:
    """A verified roster. Construct it with :func:`load_roster` or :func:`build_roster`."""

    federation: str
    version: int
    issued_at: datetime
    ca_fingerprint: str
    entries: tuple[RosterEntry, ...]

    def get(self, peer_id: str) -> RosterEntry | None:
        """The entry of ``peer_id``, or None if it is not a member."""
        for entry in self.entries:
            if entry.peer_id == peer_id:
                return entry
        return None

    def __getitem__(self, peer_id: str) -> RosterEntry:
        entry = self.get(peer_id)
        if entry is None:
            raise KeyError(f"{peer_id!r} is not in roster version {self.version}")
        return entry

    def __contains__(self, peer_id: object) -> bool:
        return any(entry.peer_id == peer_id for entry in self.entries)

    def __iter__(self) -> Iterator[RosterEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def peers(self) -> tuple[RosterEntry, ...]:
        """Entries with role ``peer`` (those that run a peer and take part in rounds)."""
        return tuple(entry for entry in self.entries if entry.role is Role.PEER)

    def verifiers(self) -> dict[str, Verifier]:
        """Protocol-signature verifiers of every member, by peer id."""
        return {entry.peer_id: entry.verifier() for entry in self.entries}


@dataclass(frozen=True, slots=True)
class SignedRoster:
    """A roster document with its detached CA signature, ready to distribute."""

    roster: Roster
    document: bytes
    signature: bytes

    def write(self, path: StrPath) -> tuple[Path, Path]:
        """Write ``path`` and ``path + '.sig'``; returns both paths."""
        target = Path(path)
        sig_path = signature_path(target)
        write_public_file(target, self.document)
        write_public_file(sig_path, self.signature)
        return target, sig_path


def signature_path(roster_path: StrPath) -> Path:
    """Where the detached signature of ``roster_path`` lives."""
    path = Path(roster_path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def _entry_from_certificate(
    cert: x509.Certificate,
    address: str | None,
    ca_cert: x509.Certificate,
    federation: str,
    source: str,
) -> RosterEntry:
    if not is_issued_by(cert, ca_cert):
        raise RosterError(f"{source}: certificate was not issued by this federation's CA")
    try:
        identity = read_identity(cert)
    except ValueError as exc:
        raise RosterError(f"{source}: {exc}") from None
    if identity.federation != federation:
        raise RosterError(
            f"{source}: certificate of {identity.peer_id!r} is for federation "
            f"{identity.federation!r}, this roster is for {federation!r}"
        )
    if identity.role is Role.PEER:
        if address is None:
            # An outbound-only site (its firewall accepts no inbound connection).
            return RosterEntry(
                peer_id=identity.peer_id,
                institution=identity.institution,
                role=identity.role,
                address=None,
                cert_fingerprint_sha256=fingerprint(cert),
                certificate=cert,
            )
        try:
            validate_address(address)
        except IdentityError as exc:
            raise RosterError(f"{source}: peer {identity.peer_id!r}: {exc}") from None
    elif address is not None:
        raise RosterError(
            f"{source}: {identity.peer_id!r} is an operator, which runs no peer, "
            f"so it cannot have an address (got {address!r})"
        )
    return RosterEntry(
        peer_id=identity.peer_id,
        institution=identity.institution,
        role=identity.role,
        address=address,
        cert_fingerprint_sha256=fingerprint(cert),
        certificate=cert,
    )


def _check_unique(entries: Iterable[RosterEntry], source: str) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.peer_id in seen:
            raise RosterError(f"{source}: peer id {entry.peer_id!r} appears twice")
        seen.add(entry.peer_id)


def _encode(roster: Roster) -> bytes:
    body = {
        "format": ROSTER_FORMAT,
        "federation": roster.federation,
        "version": roster.version,
        "issued_at": roster.issued_at.isoformat(),
        "ca_fingerprint": roster.ca_fingerprint,
        "members": [
            {
                "peer_id": entry.peer_id,
                "institution": entry.institution,
                "role": entry.role.value,
                "address": entry.address,
                "cert_fingerprint_sha256": entry.cert_fingerprint_sha256,
                "certificate": certificate_pem(entry.certificate).decode("ascii"),
            }
            for entry in roster.entries
        ],
    }
    return (json.dumps(body, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _signature_envelope(signature: bytes, ca_fingerprint: str) -> bytes:
    envelope = {
        "format": SIGNATURE_FORMAT,
        "algorithm": SIGNATURE_ALGORITHM,
        "ca_fingerprint": ca_fingerprint,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    return (json.dumps(envelope, indent=2) + "\n").encode("utf-8")


def build_roster(
    ca_dir: StrPath,
    entries: Iterable[tuple[StrPath | x509.Certificate, str | None]],
    clock: Clock = system_clock,
) -> SignedRoster:
    """Sign a new roster listing ``entries`` and keep a copy as ``ca_dir/roster.json``.

    The version is one more than the CA's previous roster, so peers can tell newer from
    older. Each certificate must have been issued by this CA; roles and institutions are
    read from the certificates.

    Args:
        entries: ``(certificate or its path, "host:port")`` per member; the address is
            ``None`` for operators and for outbound-only peers.

    Returns:
        The signed roster; call ``.write(path)`` to produce the files to distribute.

    Raises:
        RosterError: a certificate from another CA/federation, a duplicate peer id, or an
            operator with an address.
    """
    ca = open_ca(ca_dir)
    info = ca.info
    members = []
    for cert_or_path, address in entries:
        if isinstance(cert_or_path, x509.Certificate):
            cert, source = cert_or_path, "roster entry"
        else:
            cert, source = load_certificate(cert_or_path), str(cert_or_path)
        members.append(
            _entry_from_certificate(cert, address, info.certificate, info.federation, source)
        )
    _check_unique(members, "roster")
    previous = 0
    if info.roster_path.exists():
        previous = load_roster(info.roster_path, info.certificate).version
    roster = Roster(
        federation=info.federation,
        version=previous + 1,
        issued_at=aware(clock(), "clock()"),
        ca_fingerprint=info.fingerprint,
        entries=tuple(members),
    )
    document = _encode(roster)
    raw_signature = ca.key.sign(_SIGNING_LABEL + document, ec.ECDSA(hashes.SHA256()))
    signed = SignedRoster(roster, document, _signature_envelope(raw_signature, info.fingerprint))
    signed.write(info.roster_path)
    return signed


def _field(mapping: Mapping[str, Any], key: str, kind: type, source: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RosterError(f"{source}: field {key!r} is missing or not a {kind.__name__}")
    return value


def parse_roster(
    document: bytes, signature: bytes, ca_cert: x509.Certificate, source: str = "roster"
) -> Roster:
    """Verify a roster's detached signature against ``ca_cert``, then parse it.

    Nothing in ``document`` is looked at before the signature verifies.

    Raises:
        RosterError: bad or missing signature, signed by another CA, malformed content, a
            member certificate that does not match its entry or is not from ``ca_cert``.
    """
    expected_ca = fingerprint(ca_cert)
    try:
        envelope = json.loads(signature)
        if not isinstance(envelope, dict):
            raise TypeError("not an object")
        raw_signature = base64.b64decode(envelope["signature"], validate=True)
        signer = normalize_fingerprint(envelope["ca_fingerprint"])
    except (ValueError, TypeError, KeyError, binascii.Error, IdentityError) as exc:
        raise RosterError(f"{source}: its signature file is malformed ({exc})") from None
    if envelope.get("algorithm") != SIGNATURE_ALGORITHM:
        raise RosterError(f"{source}: unsupported signature algorithm {envelope.get('algorithm')}")
    if signer != expected_ca:
        raise RosterError(
            f"{source} was signed by CA {signer}, but this peer trusts CA {expected_ca}"
        )
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise RosterError(f"{source}: the CA key is not ECDSA")
    try:
        public_key.verify(raw_signature, _SIGNING_LABEL + document, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise RosterError(
            f"{source} does not match its CA signature: it was modified after the CA signed it "
            "(or the signature belongs to another roster). Ask the CA for the signed roster."
        ) from None

    try:
        body = json.loads(document)
    except ValueError as exc:
        raise RosterError(f"{source}: not JSON ({exc})") from None
    if not isinstance(body, dict) or body.get("format") != ROSTER_FORMAT:
        raise RosterError(f"{source}: not a {ROSTER_FORMAT} document")
    try:
        federation = ca_federation(ca_cert)
    except ValueError as exc:
        raise RosterError(f"{source}: {exc}") from None
    if body.get("federation") != federation:
        raise RosterError(
            f"{source} is for federation {body.get('federation')!r}, this CA is for {federation!r}"
        )
    try:
        issued_at = aware(datetime.fromisoformat(_field(body, "issued_at", str, source)))
    except ValueError as exc:
        raise RosterError(f"{source}: bad issued_at ({exc})") from None
    members = []
    for index, raw in enumerate(_field(body, "members", list, source)):
        where = f"{source} member #{index + 1}"
        if not isinstance(raw, dict):
            raise RosterError(f"{where}: not an object")
        try:
            cert = parse_certificate(_field(raw, "certificate", str, where).encode("ascii"))
        except ValueError as exc:
            raise RosterError(f"{where}: bad certificate ({exc})") from None
        address = raw.get("address")
        entry = _entry_from_certificate(
            cert, address if isinstance(address, str) else None, ca_cert, federation, where
        )
        claimed = {
            "peer_id": entry.peer_id,
            "institution": entry.institution,
            "role": entry.role.value,
            "cert_fingerprint_sha256": entry.cert_fingerprint_sha256,
        }
        for key, actual in claimed.items():
            if raw.get(key) != actual:
                raise RosterError(
                    f"{where}: {key} {raw.get(key)!r} does not match its certificate ({actual!r})"
                )
        members.append(entry)
    _check_unique(members, source)
    return Roster(
        federation=federation,
        version=_field(body, "version", int, source),
        issued_at=issued_at,
        ca_fingerprint=expected_ca,
        entries=tuple(members),
    )


def load_roster(path: StrPath, ca_cert: x509.Certificate) -> Roster:
    """Load ``path`` and verify its detached signature ``path.sig`` against ``ca_cert``.

    Raises:
        RosterError: missing file, unsigned (no ``.sig``), tampered, or malformed.
    """
    roster_path = Path(path)
    sig_path = signature_path(roster_path)
    try:
        document = roster_path.read_bytes()
    except FileNotFoundError:
        raise RosterError(f"roster {roster_path} does not exist") from None
    try:
        signature = sig_path.read_bytes()
    except FileNotFoundError:
        raise RosterError(
            f"roster {roster_path} is not signed: its signature file {sig_path} is missing. "
            "Use the roster.json and roster.json.sig produced by the CA."
        ) from None
    return parse_roster(document, signature, ca_cert, source=f"roster {roster_path}")


def current_roster(ca_dir: StrPath) -> Roster:
    """The CA's latest roster (``ca_dir/roster.json``), verified.

    Raises:
        CAError: the CA has not built a roster yet.
    """
    info = ca_info(ca_dir)
    if not info.roster_path.exists():
        raise CAError(f"the CA in {info.directory} has not built a roster yet")
    return load_roster(info.roster_path, info.certificate)
