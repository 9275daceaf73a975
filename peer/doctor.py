"""``peer doctor``: a preflight check of one hospital's site, item by item.

A site runs it before joining the federation and whenever something is wrong::

    peer doctor --config /kit/hospital-a.toml [--json]

Each check yields one or more :class:`Finding` (``OK``, ``WARN`` or ``FAIL``, what was found,
and what to do about it). ``FAIL`` means the peer cannot work as configured (it would refuse
to start, or others would refuse it); ``WARN`` means it works today but needs attention
(a certificate that expires within 30 days, a peer that is down, too little disk for the
next months). The exit code is 1 when anything failed, 0 otherwise.

What is checked, in order (a check that needs an earlier one's result is skipped, with a
``FAIL`` saying why, when that one failed):

- the configuration parses; the kit folder and config are not writable by others; the
  private key is mode 0600, owned by the user running doctor, and matches the certificate;
- the CA certificate (valid, a CA, matches ``ROOT_FINGERPRINT.txt`` when present) and this
  peer's certificate (issued by it, for this peer id, days to expiry);
- the roster's and the CRL's signatures, the CRL's ``next_update``, whether our certificate
  is revoked, and our own roster entry (role, fingerprint, address);
- the data and ledger databases: reachable, and writable, probed inside a transaction that
  is rolled back (nothing is changed);
- free disk space against the ledger's expected growth (see :func:`expected_growth`);
- TensorFlow importable, in a subprocess with a timeout (a broken install cannot hang us);
- the clock: whether the kernel reports it NTP-synchronised. Skew against the other peers
  is **not measured**: the peer service carries no server time in its answers (always a
  WARN, saying so);
- every other roster peer answers an mTLS health check from here; our own roster address
  answers one too (inbound, seen from this machine: the path through the site's firewall is
  checked by the *other* sites' doctor, whose outbound check is our inbound one).

Everything outside the process (clock, disk, subprocess, uid, timeouts) comes in through
:class:`Environment`, so tests fix it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import os
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import NamedTuple

from cryptography import x509

from peer.config import ConfigFileError, PeerConfig, load_config
from peer.identity import (
    Clock,
    IdentityError,
    RevocationList,
    Role,
    Roster,
    check_key_permissions,
    fingerprint,
    load_certificate,
    load_crl,
    load_private_key,
    load_roster,
    normalize_fingerprint,
    system_clock,
)
from peer.identity._x509 import ca_federation, is_ca_certificate, is_issued_by, read_identity

__all__ = [
    "CERT_WARN_DAYS",
    "CRL_WARN_DAYS",
    "Environment",
    "Finding",
    "Report",
    "Status",
    "expected_growth",
    "run_doctor",
]

CERT_WARN_DAYS = 30
"""A certificate (ours or the CA's) expiring within this many days is a WARN."""
CRL_WARN_DAYS = 7
"""A CRL whose next_update is within this many days is a WARN: once it passes, every peer
refuses every caller until a fresh CRL is installed."""

GROWTH_HORIZON_DAYS = 90
"""Free disk space should hold this many days of the ledger's expected growth."""
MIN_FREE_BYTES = 1 << 30
"""... and never less than 1 GiB (a young ledger has no history to extrapolate from; one
agreed round of a large model stores its checkpoint, tens of MB)."""
CRITICAL_FREE_BYTES = 100 << 20
"""Below 100 MiB free the next checkpoint may not fit: FAIL."""

ROOT_FINGERPRINT_FILE = "ROOT_FINGERPRINT.txt"


class Status(StrEnum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"


@dataclass(frozen=True, slots=True)
class Finding:
    """One checked item: its name, the verdict, what was found and what to do."""

    check: str
    status: Status
    message: str
    action: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "status": self.status.value,
            "message": self.message,
            "action": self.action,
        }


@dataclass(frozen=True, slots=True)
class Report:
    """Every finding of one doctor run, in the order checked."""

    config: str
    peer_id: str | None
    findings: tuple[Finding, ...]

    @property
    def ok(self) -> bool:
        return all(f.status is not Status.FAIL for f in self.findings)

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def count(self, status: Status) -> int:
        return sum(f.status is status for f in self.findings)

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config,
                "peer": self.peer_id,
                "ok": self.ok,
                "checks": [f.as_dict() for f in self.findings],
            },
            sort_keys=True,
        )

    def to_text(self) -> str:
        lines = [f"peer doctor: {self.peer_id or '?'} ({self.config})"]
        width = max((len(f.check) for f in self.findings), default=0)
        for f in self.findings:
            lines.append(f"{f.status.value:<4}  {f.check:<{width}}  {f.message}")
            if f.action:
                lines.append(f"{'':<4}  {'':<{width}}  -> {f.action}")
        lines.append(
            f"{self.count(Status.FAIL)} FAIL, {self.count(Status.WARN)} WARN, "
            f"{self.count(Status.OK)} OK"
        )
        return "\n".join(lines)


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def _default_probe() -> tuple[str, ...]:
    return (sys.executable, "-c", "import tensorflow as tf; print(tf.__version__)")


@dataclass(frozen=True)
class Environment:
    """The edges doctor touches, injected so tests can fix them.

    Attributes:
        clock: the current time (certificate and CRL validity).
        disk_usage: ``shutil.disk_usage`` of a path.
        import_probe: the command whose success means TensorFlow imports (its stdout's
            last line is reported as the version).
        import_timeout: seconds before the probe is killed (a FAIL, not a hang).
        peer_timeout: seconds per peer health check.
        uid: the user doctor runs as (the key must be theirs).
        ntp_synchronized: True/False from the kernel, None when it cannot tell.
    """

    clock: Clock = system_clock
    disk_usage: Callable[[Path], DiskUsage] = field(
        default=lambda path: DiskUsage(*shutil.disk_usage(path))
    )
    import_probe: Sequence[str] = field(default_factory=_default_probe)
    import_timeout: float = 180.0
    peer_timeout: float = 5.0
    uid: int = field(default_factory=os.geteuid)
    ntp_synchronized: Callable[[], bool | None] = field(default=lambda: kernel_ntp_synchronized())


# --------------------------------------------------------------------------- the run


def run_doctor(config_path: str | Path, env: Environment | None = None) -> Report:
    """Check the site configured in ``config_path``; never raises for a site problem."""
    env = env or Environment()
    findings: list[Finding] = []
    try:
        config = load_config(config_path)
    except (ConfigFileError, OSError, ValueError) as error:
        findings.append(
            Finding(
                "config",
                Status.FAIL,
                str(error),
                "fix the configuration (see the example in peer/config.py); nothing else was "
                "checked",
            )
        )
        return Report(str(config_path), None, tuple(findings))
    findings.append(Finding("config", Status.OK, f"{config.path} parsed"))
    state = _State(config, env)
    for check in (
        state.files,
        state.ca_certificate,
        state.certificate,
        state.roster,
        state.crl,
        state.roster_entry,
        state.databases,
        state.disk,
        state.tensorflow,
        state.clock,
        state.network,
    ):
        findings.extend(check())
    return Report(str(config.path), config.peer_id, tuple(findings))


@dataclass
class _State:
    """What earlier checks established, for the later ones."""

    config: PeerConfig
    env: Environment
    ca_cert: x509.Certificate | None = None
    cert: x509.Certificate | None = None
    key_ok: bool = False
    roster_: Roster | None = None
    crl_: RevocationList | None = None

    @property
    def now(self) -> datetime:
        return self.env.clock()

    # ----------------------------------------------------------------- files

    def files(self) -> Iterator[Finding]:
        config = self.config
        for path in (config.directory, config.path, config.ca, config.roster, config.crl):
            mode = path.stat().st_mode
            if mode & stat.S_IWOTH or (mode & stat.S_IWGRP and path.stat().st_gid != 0):
                yield Finding(
                    "permissions",
                    Status.FAIL,
                    f"{path} is writable by {'others' if mode & stat.S_IWOTH else 'its group'} "
                    f"(mode {stat.S_IMODE(mode):04o}): whoever can write it can replace the "
                    "CA, roster or configuration this peer trusts",
                    f"chmod go-w {path}",
                )
        try:
            check_key_permissions(config.key)
        except IdentityError as error:
            yield Finding("private key", Status.FAIL, str(error), f"chmod 600 {config.key}")
            return
        owner = config.key.stat().st_uid
        if owner != self.env.uid:
            yield Finding(
                "private key",
                Status.WARN,
                f"{config.key} is owned by uid {owner}, not by uid {self.env.uid} running doctor",
                "run doctor as the user the peer runs as (e.g. sudo -u hospital-peer peer "
                f"doctor ...), or chown that user {config.key}",
            )
        try:
            key = load_private_key(config.key)
            cert = load_certificate(config.cert)
        except (IdentityError, ValueError, OSError) as error:
            yield Finding("private key", Status.FAIL, str(error), "restore the kit's key file")
            return
        if key.public_key() != cert.public_key():
            yield Finding(
                "private key",
                Status.FAIL,
                f"{config.key} is not the key of {config.cert}",
                "put the key made by `ceremony request` for this certificate in the kit",
            )
            return
        self.key_ok = True
        yield Finding("private key", Status.OK, f"{config.key}: mode 0600, matches the certificate")

    # ----------------------------------------------------------------- certificates

    def _expiry(self, what: str, cert: x509.Certificate, renew: str) -> Finding:
        now = self.now
        if now < cert.not_valid_before_utc:
            return Finding(
                what,
                Status.FAIL,
                f"not valid until {cert.not_valid_before_utc.isoformat()} (now {now.isoformat()})",
                "check this machine's clock (timedatectl); it may be behind",
            )
        left = cert.not_valid_after_utc - now
        if left <= timedelta(0):
            return Finding(
                what,
                Status.FAIL,
                f"expired at {cert.not_valid_after_utc.isoformat()}",
                renew,
            )
        days = left.days
        message = f"valid until {cert.not_valid_after_utc.date().isoformat()} ({days} days left)"
        if left < timedelta(days=CERT_WARN_DAYS):
            return Finding(what, Status.WARN, message, renew)
        return Finding(what, Status.OK, message)

    def ca_certificate(self) -> Iterator[Finding]:
        try:
            ca_cert = load_certificate(self.config.ca)
            federation = ca_federation(ca_cert)
        except (ValueError, OSError) as error:
            yield Finding("CA certificate", Status.FAIL, str(error), "restore ca.pem from the kit")
            return
        if not is_ca_certificate(ca_cert):
            yield Finding(
                "CA certificate",
                Status.FAIL,
                f"{self.config.ca} is not a CA certificate",
                "restore ca.pem from the kit",
            )
            return
        expected = self.config.directory / ROOT_FINGERPRINT_FILE
        if expected.is_file():
            lines = expected.read_text(encoding="utf-8").split()
            try:
                wanted = normalize_fingerprint(lines[0]) if lines else ""
            except IdentityError:
                wanted = ""
            if wanted != fingerprint(ca_cert):
                yield Finding(
                    "CA certificate",
                    Status.FAIL,
                    f"{self.config.ca} has fingerprint {fingerprint(ca_cert)}, but "
                    f"{expected.name} says {wanted or 'nothing readable'}",
                    "get ca.pem again and compare its fingerprint with the one the consortium "
                    "read out to you",
                )
                return
        self.ca_cert = ca_cert
        found = self._expiry(
            "CA certificate", ca_cert, "the consortium must issue a new root CA and new kits"
        )
        yield Finding(
            found.check,
            found.status,
            f"federation {federation!r}, {fingerprint(ca_cert)}, {found.message}",
            found.action,
        )

    def certificate(self) -> Iterator[Finding]:
        config = self.config
        try:
            cert = load_certificate(config.cert)
        except (ValueError, OSError) as error:
            yield Finding("certificate", Status.FAIL, str(error), "restore the kit's certificate")
            return
        if self.ca_cert is None:
            yield Finding("certificate", Status.FAIL, "not checked: the CA certificate is unusable")
            return
        if not is_issued_by(cert, self.ca_cert):
            yield Finding(
                "certificate",
                Status.FAIL,
                f"{config.cert} was not issued by the CA in {config.ca}",
                "use the certificate the consortium CA signed for this site",
            )
            return
        try:
            identity = read_identity(cert)
        except ValueError as error:
            yield Finding("certificate", Status.FAIL, f"{config.cert}: {error}")
            return
        if identity.peer_id != config.peer_id or identity.role is not Role.PEER:
            yield Finding(
                "certificate",
                Status.FAIL,
                f"{config.cert} is the {identity.role.value} certificate of "
                f"{identity.peer_id!r}, but this configuration is for peer {config.peer_id!r}",
                "fix peer_id or [tls] cert in the configuration",
            )
            return
        self.cert = cert
        renew = (
            "renew it: `ceremony request` a new CSR, have the CA `sign` it and publish a new "
            "roster, then install both"
        )
        found = self._expiry("certificate", cert, renew)
        yield Finding(
            found.check,
            found.status,
            f"{identity.peer_id} ({identity.institution}), {found.message}",
            found.action,
        )

    # ----------------------------------------------------------------- roster and CRL

    def roster(self) -> Iterator[Finding]:
        if self.ca_cert is None:
            yield Finding("roster", Status.FAIL, "not checked: the CA certificate is unusable")
            return
        try:
            roster = load_roster(self.config.roster, self.ca_cert)
        except (IdentityError, ValueError, OSError) as error:
            yield Finding(
                "roster",
                Status.FAIL,
                str(error),
                "install roster.json and roster.json.sig exactly as the CA published them",
            )
            return
        self.roster_ = roster
        age = (self.now - roster.issued_at).days
        yield Finding(
            "roster",
            Status.OK,
            f"version {roster.version}, signed by the CA, {len(roster.peers)} peers, issued "
            f"{roster.issued_at.date().isoformat()} ({age} days ago)",
        )

    def crl(self) -> Iterator[Finding]:
        if self.ca_cert is None:
            yield Finding("CRL", Status.FAIL, "not checked: the CA certificate is unusable")
            return
        fetch = "install a fresh crl.pem from the CA (`ceremony` refreshes it at the CA)"
        try:
            crl = load_crl(self.config.crl, self.ca_cert)
        except (IdentityError, ValueError, OSError) as error:
            yield Finding("CRL", Status.FAIL, str(error), fetch)
            return
        self.crl_ = crl
        left = crl.next_update - self.now
        message = (
            f"number {crl.number}, signed by the CA, {len(crl.serial_numbers)} revoked, next "
            f"update {crl.next_update.isoformat()}"
        )
        if left <= timedelta(0):
            yield Finding(
                "CRL",
                Status.FAIL,
                f"{message}: stale, so this peer refuses every caller",
                fetch,
            )
        elif left < timedelta(days=CRL_WARN_DAYS):
            yield Finding("CRL", Status.WARN, f"{message} ({left.days} days left)", fetch)
        else:
            yield Finding("CRL", Status.OK, message)
        if self.cert is not None and crl.revoked(self.cert.serial_number) is not None:
            yield Finding(
                "CRL",
                Status.FAIL,
                f"our own certificate (serial {self.cert.serial_number:X}) is revoked",
                "request a new certificate from the CA",
            )

    def roster_entry(self) -> Iterator[Finding]:
        roster, config = self.roster_, self.config
        if roster is None:
            yield Finding("roster entry", Status.FAIL, "not checked: the roster is unusable")
            return
        entry = roster.get(config.peer_id)
        ask = "ask the CA for a roster that lists this site (`ceremony roster`), and install it"
        if entry is None:
            yield Finding(
                "roster entry",
                Status.FAIL,
                f"{config.peer_id!r} is not in roster version {roster.version}: every peer "
                "refuses it",
                ask,
            )
            return
        if entry.role is not Role.PEER or entry.address is None:
            yield Finding(
                "roster entry",
                Status.FAIL,
                f"the roster lists {config.peer_id!r} as {entry.role.value} without an address",
                ask,
            )
            return
        if self.cert is not None and entry.cert_fingerprint_sha256 != fingerprint(self.cert):
            yield Finding(
                "roster entry",
                Status.FAIL,
                f"the roster lists {entry.cert_fingerprint_sha256} for {config.peer_id!r}, "
                f"but {config.cert} has {fingerprint(self.cert)}",
                "install the certificate the roster lists, or ask the CA for a roster with "
                "this certificate",
            )
            return
        listen_port = config.listen.rpartition(":")[2]
        roster_port = entry.address.rpartition(":")[2]
        if listen_port != roster_port:
            yield Finding(
                "roster entry",
                Status.WARN,
                f"others dial {entry.address} but this peer listens on {config.listen}",
                "fine behind a port-forwarding firewall; otherwise fix 'listen' or the roster",
            )
            return
        yield Finding(
            "roster entry",
            Status.OK,
            f"{config.peer_id} at {entry.address}, fingerprint matches the certificate",
        )

    # ----------------------------------------------------------------- storage

    def databases(self) -> Iterator[Finding]:
        yield probe_database("data database", self.config.data_url)
        yield probe_database("ledger database", self.config.ledger_url)

    def disk(self) -> Iterator[Finding]:
        path = sqlite_file(self.config.ledger_url)
        if path is None:
            yield Finding(
                "disk space",
                Status.OK,
                "the ledger is in a database server; check that server's disk",
            )
            return
        usage = self.env.disk_usage(_existing_parent(path))
        need, basis = expected_growth(self.config.ledger_url, path, self.now)
        message = (
            f"{_size(usage.free)} free on {_existing_parent(path)}; {_size(need)} needed ({basis})"
        )
        if usage.free < CRITICAL_FREE_BYTES:
            yield Finding(
                "disk space", Status.FAIL, message, "free disk space before the next round"
            )
        elif usage.free < need:
            yield Finding(
                "disk space", Status.WARN, message, "add disk space within the next weeks"
            )
        else:
            yield Finding("disk space", Status.OK, message)

    # ----------------------------------------------------------------- runtime

    def tensorflow(self) -> Iterator[Finding]:
        trains = {"logreg", "mlp"} & set(self.config.policy.allowed_models)
        bad = Status.FAIL if trains else Status.WARN
        why = (
            f"this peer's policy allows {', '.join(sorted(trains))}, which train with it"
            if trains
            else "only needed for training sessions, which this peer's policy does not allow"
        )
        try:
            done = subprocess.run(  # noqa: S603 (a fixed command, no shell)
                list(self.env.import_probe),
                capture_output=True,
                text=True,
                timeout=self.env.import_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            yield Finding(
                "tensorflow",
                bad,
                f"importing TensorFlow did not finish within {self.env.import_timeout:.0f} s "
                f"({why})",
                "check the TensorFlow install (python -c 'import tensorflow')",
            )
            return
        except OSError as error:
            yield Finding("tensorflow", bad, f"cannot run the import probe: {error}")
            return
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            yield Finding(
                "tensorflow",
                bad,
                f"TensorFlow does not import: {last} ({why})",
                "pip install the package again in the peer's environment (tensorflow-cpu)",
            )
            return
        version = (done.stdout.strip().splitlines() or ["?"])[-1]
        yield Finding("tensorflow", Status.OK, f"imports (version {version})")

    def clock(self) -> Iterator[Finding]:
        synced = self.env.ntp_synchronized()
        if synced is False:
            yield Finding(
                "clock",
                Status.WARN,
                "the kernel reports the clock is not NTP-synchronised; certificates and the "
                "CRL are checked against it",
                "enable time synchronisation (timedatectl set-ntp true, or chrony)",
            )
        yield Finding(
            "clock skew",
            Status.WARN,
            "not measured: the peer service carries no server time in its answers, so skew "
            "against other peers cannot be measured without a server change",
            "make sure every site synchronises its clock with NTP",
        )

    # ----------------------------------------------------------------- network

    def network(self) -> Iterator[Finding]:
        roster, config = self.roster_, self.config
        if roster is None or not self.key_ok:
            yield Finding(
                "peers",
                Status.FAIL,
                "not checked: the roster or this site's key/certificate is unusable",
            )
            return
        others = [e for e in roster.peers if e.peer_id != config.peer_id]
        results = asyncio.run(self._dial_all([e.peer_id for e in others]))
        reachable = 0
        for entry in others:
            error = results[entry.peer_id]
            if error is None:
                reachable += 1
                yield Finding(f"peer {entry.peer_id}", Status.OK, f"answers at {entry.address}")
            else:
                yield Finding(
                    f"peer {entry.peer_id}",
                    _dial_status(error),
                    str(error),
                    _dial_action(error, entry.address or "?"),
                )
        if others and reachable == 0:
            yield Finding(
                "peers",
                Status.FAIL,
                f"none of the {len(others)} other peers answers: this site cannot take part",
                "check this site's outbound firewall to the roster addresses",
            )
        yield from self._inbound()

    async def _dial_all(self, peer_ids: Sequence[str]) -> dict[str, Exception | None]:
        results = await asyncio.gather(*(self._dial(peer_id) for peer_id in peer_ids))
        return dict(zip(peer_ids, results, strict=True))

    async def _dial(self, peer_id: str) -> Exception | None:
        from peer.tls import TLSFiles, TransportError, check_peer, peer_channel

        assert self.roster_ is not None
        config = self.config
        files = TLSFiles(config.cert, config.key, config.ca)
        target = self.roster_[peer_id].address or "?"
        try:
            async with peer_channel(self.roster_, peer_id, files) as channel:
                await check_peer(
                    channel,
                    target=target,
                    peer=peer_id,
                    timeout=self.env.peer_timeout,
                    attempts=1,
                )
        except TransportError as error:
            return error
        return None

    def _inbound(self) -> Iterator[Finding]:
        assert self.roster_ is not None
        config = self.config
        entry = self.roster_.get(config.peer_id)
        if entry is None or entry.address is None:
            return  # reported by the roster entry check
        error = asyncio.run(self._dial(config.peer_id))
        if error is None:
            yield Finding(
                "inbound",
                Status.OK,
                f"this peer answers at its roster address {entry.address} (seen from this "
                "machine; other sites' doctor checks the path through the firewall)",
            )
            return
        if _port_is_free(config.listen):
            yield Finding(
                "inbound",
                Status.WARN,
                f"nothing listens on {config.listen}: the peer is not running, so inbound "
                "reachability was not checked",
                "start the peer and run doctor again",
            )
            return
        yield Finding(
            "inbound",
            Status.FAIL,
            f"something listens on {config.listen}, but our roster address {entry.address} "
            f"does not answer as this peer: {error}",
            "check that the roster address resolves to this machine and that the process on "
            "the port is this peer",
        )


# --------------------------------------------------------------------------- helpers


def _dial_status(error: Exception) -> Status:
    from peer.tls import HandshakeError, PeerRejectedError

    # A peer that is down is its problem (and the federation tolerates dropouts); a peer
    # that refuses us, or that we refuse, is a configuration problem on one side.
    return Status.FAIL if isinstance(error, HandshakeError | PeerRejectedError) else Status.WARN


def _dial_action(error: Exception, address: str) -> str:
    from peer.tls import HandshakeError, PeerRejectedError

    if isinstance(error, PeerRejectedError):
        return "that peer does not accept our certificate: check that it runs the current roster"
    if isinstance(error, HandshakeError):
        return (
            "the TLS handshake failed: compare both sites' CA fingerprints and rosters, and "
            "check the certificate dates"
        )
    return f"the peer may be down; otherwise open the outbound firewall to {address}"


def _port_is_free(listen: str) -> bool:
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError:
            return False
    return True


def sqlite_file(url: str) -> Path | None:
    """The file of an SQLite URL (None for in-memory or other databases)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    database = parsed.database
    if database.startswith("file:"):  # SQLite's URI form: file:path?mode=ro
        database = database[len("file:") :].partition("?")[0]
    return Path(database)


def _existing_parent(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate if candidate.is_dir() else candidate.parent
    return Path("/")


# Written inside a transaction that is always rolled back: proves the write path, changes
# nothing.
_PROBE_SQL = (
    "CREATE TABLE _peer_doctor_probe (x INTEGER)",
    "INSERT INTO _peer_doctor_probe VALUES (1)",
)


def probe_database(check: str, url: str) -> Finding:
    """Connect to ``url`` and prove it writable inside a transaction that is rolled back.

    SQLite: ``BEGIN IMMEDIATE`` (takes the write lock), create a probe table and insert a
    row, ``ROLLBACK``. PostgreSQL: the same in an ordinary transaction (its DDL is
    transactional). Other databases commit DDL implicitly, so they are only read.
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    shown = make_url(url).render_as_string(hide_password=True)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        parent = path.parent
        if parent.is_dir() and os.access(parent, os.W_OK):
            return Finding(
                check, Status.OK, f"{path} does not exist yet; the peer creates it when needed"
            )
        return Finding(
            check,
            Status.FAIL,
            f"{path} does not exist and {parent} is not a writable folder",
            f"create {parent} writable by the peer's user, or fix [storage] in the config",
        )
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            backend = engine.dialect.name
            if backend == "sqlite":
                raw = conn.connection.dbapi_connection
                assert raw is not None
                # pysqlite would not open a transaction before DDL (it would commit the
                # probe table at once): take over transaction control and BEGIN ourselves.
                raw.isolation_level = None
                cursor = raw.cursor()
                try:
                    cursor.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in _PROBE_SQL:
                            cursor.execute(statement)
                    finally:
                        cursor.execute("ROLLBACK")
                finally:
                    cursor.close()
            elif backend == "postgresql":
                with conn.begin() as transaction:
                    for statement in _PROBE_SQL:
                        conn.execute(text(statement))
                    transaction.rollback()
            else:
                conn.execute(text("SELECT 1"))
                return Finding(
                    check,
                    Status.WARN,
                    f"{shown} is reachable; writability not probed ({backend} commits DDL "
                    "implicitly, and doctor changes nothing)",
                    "check that the peer's database user may create tables and insert",
                )
    except SQLAlchemyError as error:
        reason = str(getattr(error, "orig", None) or error).splitlines()[0]
        return Finding(
            check,
            Status.FAIL,
            f"{shown}: {reason}",
            "make the database writable by the peer's user (file and folder for SQLite)",
        )
    except sqlite3.Error as error:  # raised by the raw cursor, below SQLAlchemy's wrapping
        return Finding(
            check,
            Status.FAIL,
            f"{shown}: {error}",
            "make the database file and its folder writable by the peer's user",
        )
    finally:
        engine.dispose()
    return Finding(check, Status.OK, f"{shown} reachable and writable (probe rolled back)")


def expected_growth(url: str, path: Path, now: datetime) -> tuple[int, str]:
    """Bytes of free disk the ledger should have, and how that was estimated.

    The rule: :data:`GROWTH_HORIZON_DAYS` of the ledger's growth so far (its size, with the
    WAL, divided by the days since its first session), and at least :data:`MIN_FREE_BYTES`.
    """
    size = sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    first = _first_session(url) if size else None
    if first is None or size == 0:
        return MIN_FREE_BYTES, "no ledger history yet: the 1 GiB minimum"
    days = max((now - first).total_seconds() / 86400, 1.0)
    need = int(size / days * GROWTH_HORIZON_DAYS)
    basis = (
        f"the ledger grew {_size(size)} in {days:.0f} days: {GROWTH_HORIZON_DAYS} more days at "
        "that rate, at least 1 GiB"
    )
    return max(need, MIN_FREE_BYTES), basis


def _first_session(url: str) -> datetime | None:
    from sqlalchemy.exc import SQLAlchemyError

    from peer.ledger import Ledger, LedgerError

    try:
        with Ledger(url) as ledger:
            sessions = ledger.sessions()
    except (LedgerError, SQLAlchemyError):  # an unreadable ledger gives no history
        return None
    return min((s.created_at for s in sessions), default=None)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class _Timex(ctypes.Structure):
    # struct timex of <sys/timex.h> begins with ``unsigned int modes``; the rest is never
    # read here, so it is padding large enough for every architecture's layout.
    _fields_ = (("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256))


_TIME_ERROR = 5  # adjtimex: "clock not synchronized"


def kernel_ntp_synchronized() -> bool | None:
    """Whether the kernel considers the clock synchronised (``adjtimex``), None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)
