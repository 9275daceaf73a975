"""A whole federation on one machine: CA, one kit folder per hospital, an operator.

Used by ``ceremony demo`` and by the tests. Each hospital's folder holds exactly what its IT
staff would receive or create on site (config, certificate, private key, CA certificate,
roster, CRL), so a peer can be started again by hand with ``peer start --config ...``.
"""

from __future__ import annotations

import secrets
import shutil
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .identity import Role
from .identity.testing import LocalFederation
from .ledger import Ledger, verify_ledger

__all__ = ["Kit", "LocalKit", "free_port", "write_peer_config"]


_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST_PORT = 10_000


def free_port(host: str = "127.0.0.1", *, taken: Collection[int] = ()) -> int:
    """A TCP port that is free right now, not in ``taken``, below the OS's ephemeral range.

    A port the OS hands out for binding port 0 comes from the ephemeral range, which every
    outgoing connection also draws from: by the time the peer given that port starts, a
    connection between peers already running may hold it (seen starting 50 peers in
    ``bench scale``). Ports below the range are taken only by listeners.
    """
    try:
        ephemeral_low = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768  # Linux's default; elsewhere, port 0 below
    for _ in range(200):
        if ephemeral_low <= _LOWEST_PORT:
            break
        # Not secret: any unpredictable-enough spread over the range will do.
        port = _LOWEST_PORT + secrets.randbelow(ephemeral_low - _LOWEST_PORT)
        if port not in taken and _bindable(host, port):
            return port
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            chosen: int = sock.getsockname()[1]
        if chosen not in taken:
            return chosen


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Kit:
    peer_id: str
    directory: Path
    config: Path
    address: str


def write_peer_config(
    path: Path,
    peer_id: str,
    listen: str,
    *,
    stage_seconds: float = 30.0,
    policy: Mapping[str, object] | None = None,
    extra: str = "",
) -> None:
    policy_lines = "\n".join(f"{k} = {_toml(v)}" for k, v in (policy or {}).items())
    path.write_text(
        f"""# Peer configuration of {peer_id}. Paths are relative to this file.
peer_id = "{peer_id}"
listen = "{listen}"
{extra}
[tls]
cert = "{peer_id}.pem"
key = "{peer_id}.key"
ca = "ca.pem"
roster = "roster.json"
crl = "crl.pem"

[storage]
data = "sqlite:///data.db"
ledger = "sqlite:///ledger.db"

[policy]
# Deny by default (SECURITY.md, "Peer layer"): only the operators in allowed_operators (and
# the peers in allowed_peer_proposers) may propose; at least 3 participants; exact sums
# (payload "vector") only with allow_exact_payloads = true.
{policy_lines}

[timeouts]
stage_seconds = {stage_seconds}

# Prometheus metrics (peer/metrics.py), off unless this table is present:
# [metrics]
# listen = "127.0.0.1:9464"
# allow_remote = false
""",
        encoding="utf-8",
    )


def _toml(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@dataclass
class LocalKit:
    """The result of :meth:`create`: the federation and one kit per hospital."""

    federation: LocalFederation
    kits: dict[str, Kit]
    operator: str

    @classmethod
    def create(
        cls,
        directory: Path,
        peers: Sequence[str],
        *,
        federation: str = "demo",
        operator: str = "ceremony-operator",
        host: str = "127.0.0.1",
        stage_seconds: float = 30.0,
        policy: Mapping[str, object] | None = None,
        outbound_only: Sequence[str] = (),
    ) -> LocalKit:
        """Args:
        outbound_only: peers whose roster entry has no address (peer/relay.py); they
            still listen locally, but nobody dials them.
        """
        directory.mkdir(parents=True, exist_ok=True)
        ports: list[int] = []
        for _ in peers:
            ports.append(free_port(host, taken=ports))
        addresses = {p: f"{host}:{port}" for p, port in zip(peers, ports, strict=True)}
        fed = LocalFederation.create(
            directory / "identities",
            federation=federation,
            peers=peers,
            operators=[operator],
            addresses=addresses,
            outbound_only=outbound_only,
        )
        policy = {"allowed_operators": [operator], **(policy or {})}
        kits: dict[str, Kit] = {}
        for peer_id in peers:
            member = fed.members[peer_id]
            site = member.cert.parent  # where the key was generated on site
            for source in (fed.ca.cert_path, fed.roster_path, fed.ca.crl_path):
                assert source is not None
                shutil.copy(source, site / source.name)
            roster_sig = Path(str(fed.roster_path) + ".sig")
            shutil.copy(roster_sig, site / roster_sig.name)
            (site / "ROOT_FINGERPRINT.txt").write_text(
                f"{fed.ca.fingerprint}\n"
                "Check this against the fingerprint the consortium read out.\n",
                encoding="utf-8",
            )
            config = site / f"{peer_id}.toml"
            write_peer_config(
                config, peer_id, addresses[peer_id], stage_seconds=stage_seconds, policy=policy
            )
            kits[peer_id] = Kit(peer_id, site, config, addresses[peer_id])
        return cls(fed, kits, operator)

    def ledger(self, peer_id: str) -> Ledger:
        """The ledger of ``peer_id``, wherever its configuration puts it."""
        return Ledger(load_config(self.kits[peer_id].config).ledger_url)

    def ledger_problems(self, peer_id: str) -> list[str]:
        """What :func:`peer.ledger.verify_ledger` finds wrong in ``peer_id``'s ledger."""
        with self.ledger(peer_id) as ledger:
            report = verify_ledger(ledger, self.federation.roster.verifiers())
        return [str(problem) for problem in report.problems]

    def operator_files(self) -> tuple[Path, Path, Path]:
        member = self.federation.members[self.operator]
        assert member.role is Role.OPERATOR
        return member.cert, member.key, member.ca
