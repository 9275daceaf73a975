"""Names: peer ids, federations, roles, identity URIs, hostnames, fingerprints, clocks."""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peer.identity._errors import InvalidNameError

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware datetime. Injected so tests can fix it."""


def system_clock() -> datetime:
    """The wall clock, in UTC. The production :data:`Clock`."""
    return datetime.now(UTC)


def aware(moment: datetime, what: str = "time") -> datetime:
    """``moment`` converted to UTC; a naive datetime is a bug in the caller, so it raises."""
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware, got naive {moment.isoformat()}")
    return moment.astimezone(UTC)


class Role(StrEnum):
    """What a certificate holder may do.

    A ``peer`` runs a peer process and takes part in rounds; an ``operator`` may propose
    sessions and query peers but never runs a peer or holds shares.
    """

    PEER = "peer"
    OPERATOR = "operator"


# One DNS label (RFC 1123), lower case only: peer ids and federation names become labels
# of the identity hostname below, so both must be valid labels.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_LABEL_RE = re.compile(_LABEL)
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

IDENTITY_DNS_SUFFIX = "secagg.invalid"
"""Parent of the per-identity DNS names the CA adds to every certificate.

``.invalid`` is reserved (RFC 2606) and never resolves, so these names can only ever be
matched through gRPC's ``grpc.ssl_target_name_override``: a client that sets the override to
:func:`identity_hostname` makes the TLS layer itself check it reached exactly that peer.
"""


def validate_peer_id(peer_id: str) -> str:
    """Return ``peer_id`` if it is 1-63 chars of ``[a-z0-9-]`` not starting/ending with ``-``.

    Raises:
        InvalidNameError: otherwise, naming the offending value.
    """
    if not isinstance(peer_id, str) or not _LABEL_RE.fullmatch(peer_id):
        raise InvalidNameError(
            f"invalid peer id {peer_id!r}: use 1-63 characters a-z, 0-9 and '-', "
            "starting and ending with a letter or digit (e.g. 'hospital-a')"
        )
    return peer_id


def validate_federation(federation: str) -> str:
    """Return ``federation`` if it follows the same rule as peer ids.

    Raises:
        InvalidNameError: otherwise.
    """
    if not isinstance(federation, str) or not _LABEL_RE.fullmatch(federation):
        raise InvalidNameError(
            f"invalid federation name {federation!r}: use 1-63 characters a-z, 0-9 and '-', "
            "starting and ending with a letter or digit (e.g. 'cardio-2025')"
        )
    return federation


def validate_institution(institution: str, what: str = "institution name") -> str:
    """Return ``institution`` if it fits an X.509 organization name (1-64 printable chars).

    Raises:
        InvalidNameError: otherwise.
    """
    if (
        not isinstance(institution, str)
        or not 1 <= len(institution) <= 64
        or not institution.isprintable()
        or institution != institution.strip()
    ):
        raise InvalidNameError(
            f"invalid {what} {institution!r}: use 1-64 printable characters "
            "without leading or trailing spaces"
        )
    return institution


def validate_hostname(hostname: str) -> str:
    """Return ``hostname`` lower-cased if it is a valid DNS name (no wildcards).

    Names under :data:`IDENTITY_DNS_SUFFIX` are refused: only the CA may put those in a
    certificate, so that they keep naming exactly one identity.

    Raises:
        InvalidNameError: otherwise.
    """
    name = hostname.lower().rstrip(".") if isinstance(hostname, str) else ""
    if _is_ip(name):
        # "10.1.2.3" also matches the label grammar; as a DNS SAN it would never match a
        # client that dials the IP (RFC 6125 compares IPs only with IP SANs).
        raise InvalidNameError(
            f"{hostname!r} is an IP address, not a DNS hostname: it belongs in an IP address "
            "SAN (ceremony request --host or --ip puts it there)"
        )
    if not name or len(name) > 253 or not _HOSTNAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid DNS hostname {hostname!r} (no wildcards allowed)")
    if name == IDENTITY_DNS_SUFFIX or name.endswith("." + IDENTITY_DNS_SUFFIX):
        raise InvalidNameError(
            f"hostname {hostname!r} is under the reserved {IDENTITY_DNS_SUFFIX!r}: "
            "the CA adds that name itself"
        )
    return name


def validate_ip(
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an IP address, raising :class:`InvalidNameError` with the value if it is not one."""
    try:
        return ipaddress.ip_address(ip)
    except ValueError:
        raise InvalidNameError(f"invalid IP address {ip!r}") from None


def split_hosts(
    hosts: Iterable[str],
) -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """Sort names a peer is reached at into DNS hostnames and IP addresses (for the SANs).

    Raises:
        InvalidNameError: an entry is neither a valid hostname nor an IP address.
    """
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in hosts:
        text = host.strip("[]") if isinstance(host, str) else host
        if isinstance(text, str) and _is_ip(text):
            ips.append(ipaddress.ip_address(text))
        else:
            dns.append(validate_hostname(host))
    return dns, ips


def validate_address(address: str) -> str:
    """Return ``address`` if it is ``host:port`` (IPv6 hosts in brackets, port 1-65535).

    Raises:
        InvalidNameError: otherwise.
    """
    host, sep, port = address.rpartition(":") if isinstance(address, str) else ("", "", "")
    if host.startswith("[") and host.endswith("]"):
        host_ok = _is_ip(host[1:-1])
    else:
        host_ok = _HOSTNAME_RE.fullmatch(host.lower()) is not None or _is_ip(host)
    if not sep or not host_ok or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InvalidNameError(
            f"invalid peer address {address!r}: expected host:port, e.g. "
            "'hospital-a.example.org:7443', '10.0.0.5:7443' or '[2001:db8::5]:7443'"
        )
    return address


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def identity_uri(federation: str, role: Role, peer_id: str) -> str:
    """The URI SAN naming an identity: ``urn:<federation>:<role>:<peer_id>``."""
    return f"urn:{validate_federation(federation)}:{Role(role)}:{validate_peer_id(peer_id)}"


def ca_uri(federation: str) -> str:
    """The URI SAN of a federation's root CA certificate: ``urn:<federation>:ca``."""
    return f"urn:{validate_federation(federation)}:ca"


def parse_identity_uri(uri: str) -> tuple[str, Role, str]:
    """Split ``urn:<federation>:<role>:<peer_id>`` into its parts.

    Raises:
        InvalidNameError: if ``uri`` does not have that shape or a part is invalid.
    """
    parts = uri.split(":")
    if len(parts) != 4 or parts[0] != "urn" or parts[2] not in {r.value for r in Role}:
        raise InvalidNameError(
            f"identity URI {uri!r} is not of the form urn:<federation>:peer|operator:<id>"
        )
    return validate_federation(parts[1]), Role(parts[2]), validate_peer_id(parts[3])


def identity_hostname(federation: str, role: Role, peer_id: str) -> str:
    """The reserved DNS name the CA puts in ``peer_id``'s certificate.

    ``<peer_id>.<role>.<federation>.secagg.invalid``; see :data:`IDENTITY_DNS_SUFFIX`.
    """
    return (
        f"{validate_peer_id(peer_id)}.{Role(role)}.{validate_federation(federation)}."
        f"{IDENTITY_DNS_SUFFIX}"
    )


FINGERPRINT_PREFIX = "SHA256:"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate as ``SHA256:AB:CD:...`` (upper-case hex pairs).

    This is the format ``openssl x509 -noout -fingerprint -sha256`` prints after its
    ``sha256 Fingerprint=`` label, so IT staff can compare it with standard tools.
    """
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return FINGERPRINT_PREFIX + format_fingerprint_hex(digest)


def format_fingerprint_hex(hex_digest: str) -> str:
    """``abcd...`` -> ``AB:CD:...``."""
    upper = hex_digest.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def normalize_fingerprint(text: str) -> str:
    """Accept a fingerprint typed or pasted in any common spelling; return the canonical one.

    Accepts an optional ``SHA256:`` / ``sha256 Fingerprint=`` prefix, colons or none, any case.

    Raises:
        InvalidNameError: if what remains is not 64 hex digits.
    """
    cleaned = text.strip()
    for prefix in ("sha256 fingerprint=", "sha256:", "sha256="):
        if cleaned.lower().startswith(prefix):
            cleaned = cleaned[len(prefix) :]
            break
    hex_digits = cleaned.replace(":", "").replace(" ", "")
    if len(hex_digits) != 64 or any(c not in "0123456789abcdefABCDEF" for c in hex_digits):
        raise InvalidNameError(f"not a SHA-256 fingerprint: {text!r}")
    return FINGERPRINT_PREFIX + format_fingerprint_hex(hex_digits)
