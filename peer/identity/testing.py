"""A whole federation on disk in one call, for tests and local demos.

It runs the real ceremony (:func:`init_ca`, :func:`create_request`, :func:`sign_request`,
:func:`build_roster`), only with every party in one directory tree::

    fed = LocalFederation.create(tmp_path, peers=["hospital-a", "hospital-b"])
    fed.members["hospital-a"].cert, .key, .ca    # the files a peer needs
    fed.roster, fed.crl                           # verified trust state
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509

from peer.identity._ca import DEFAULT_CERT_DAYS, create_request, init_ca, sign_request
from peer.identity._files import StrPath
from peer.identity._names import Clock, Role, system_clock
from peer.identity._revocation import RevocationList, current_crl, revoke
from peer.identity._roster import Roster, build_roster, load_roster
from peer.identity._store import CAInfo


@dataclass(frozen=True, slots=True)
class Member:
    """One institution's files, as its peer would have them."""

    peer_id: str
    institution: str
    role: Role
    cert: Path
    key: Path
    ca: Path

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


@dataclass(slots=True)
class LocalFederation:
    """A CA plus members under one directory: ``ca/``, ``<peer_id>/`` per member."""

    directory: Path
    ca: CAInfo
    members: dict[str, Member] = field(default_factory=dict)
    roster_path: Path | None = None

    @classmethod
    def create(
        cls,
        directory: StrPath,
        *,
        federation: str = "test-fed",
        peers: Iterable[str] = ("hospital-a", "hospital-b", "hospital-c"),
        operators: Iterable[str] = (),
        clock: Clock = system_clock,
        addresses: Mapping[str, str] | None = None,
        outbound_only: Iterable[str] = (),
    ) -> LocalFederation:
        """Create a CA and members, and publish a roster of all of them.

        Peers get address ``addresses[peer_id]`` (default ``127.0.0.1:1``, a placeholder for
        tests that dial ports chosen at run time); those in ``outbound_only`` get none.
        """
        root = Path(directory)
        ca = init_ca(root / "ca", federation, f"{federation} root CA", clock=clock)
        fed = cls(root, ca)
        for peer_id in peers:
            fed.add_member(peer_id, clock=clock)
        for operator_id in operators:
            fed.add_member(operator_id, role=Role.OPERATOR, clock=clock)
        fed.publish_roster(addresses or {}, clock=clock, outbound_only=outbound_only)
        return fed

    def add_member(
        self,
        peer_id: str,
        *,
        role: Role = Role.PEER,
        institution: str | None = None,
        validity_days: int = DEFAULT_CERT_DAYS,
        clock: Clock = system_clock,
        hostnames: Iterable[str] = ("localhost",),
        ips: Iterable[str] = ("127.0.0.1",),
        subdirectory: str | None = None,
    ) -> Member:
        """Key + CSR in ``<peer_id>/`` (or ``subdirectory``), signed by the CA (not rostered)."""
        site = self.directory / (subdirectory or peer_id)
        name = institution or f"Institution {peer_id}"
        request = create_request(site, peer_id, name, self.ca.federation, hostnames, ips, role=role)
        cert_path = site / f"{peer_id}.pem"
        sign_request(
            self.ca.directory, request.csr, cert_path, validity_days, clock=clock, role=role
        )
        member = Member(peer_id, name, role, cert_path, request.key, self.ca.cert_path)
        self.members[peer_id] = member
        return member

    def publish_roster(
        self,
        addresses: Mapping[str, str],
        *,
        include: Iterable[str] | None = None,
        clock: Clock = system_clock,
        outbound_only: Iterable[str] = (),
    ) -> Roster:
        """Sign a roster of ``include`` (default: every member) and write ``roster.json``;
        the peers in ``outbound_only`` get no address (peer/relay.py)."""
        chosen = list(include) if include is not None else list(self.members)
        no_address = set(outbound_only)
        entries: list[tuple[StrPath | x509.Certificate, str | None]] = []
        for peer_id in chosen:
            member = self.members[peer_id]
            if peer_id in no_address:
                entries.append((member.cert, None))
                continue
            address = None if member.role is Role.OPERATOR else addresses.get(peer_id)
            entries.append((member.cert, address or _default_address(member)))
        signed = build_roster(self.ca.directory, entries, clock=clock)
        self.roster_path, _ = signed.write(self.directory / "roster.json")
        return signed.roster

    @property
    def roster(self) -> Roster:
        assert self.roster_path is not None
        return load_roster(self.roster_path, self.ca.certificate)

    @property
    def crl(self) -> RevocationList:
        return current_crl(self.ca.directory)

    def revoke(
        self, peer_id: str, reason: str = "key_compromise", clock: Clock = system_clock
    ) -> RevocationList:
        """Revoke ``peer_id``'s current certificate."""
        return revoke(self.ca.directory, self.members[peer_id].cert, reason, clock)


def _default_address(member: Member) -> str | None:
    return None if member.role is Role.OPERATOR else "127.0.0.1:1"
