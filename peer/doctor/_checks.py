"""The checks of one site, in order; each yields findings and records what later ones need."""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from peer.config import PeerConfig
from peer.doctor._environment import Environment
from peer.doctor._network import check_network
from peer.doctor._report import Finding, Status
from peer.doctor._storage import (
    CRITICAL_FREE_BYTES,
    existing_parent,
    expected_growth,
    probe_database,
    size_text,
    sqlite_file,
)
from peer.identity import (
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
)
from peer.identity._x509 import ca_federation, is_ca_certificate, is_issued_by, read_identity

CERT_WARN_DAYS = 30
"""A certificate (ours or the CA's) expiring within this many days is a WARN."""
CRL_WARN_DAYS = 7
"""A CRL whose next_update is within this many days is a WARN: once it passes, every peer
refuses every caller until a fresh CRL is installed."""

ROOT_FINGERPRINT_FILE = "ROOT_FINGERPRINT.txt"


@dataclass
class SiteChecks:
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
        mode = stat.S_IMODE(config.key.stat().st_mode)
        yield Finding(
            "private key", Status.OK, f"{config.key}: mode {mode:04o}, matches the certificate"
        )

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
        if entry.role is not Role.PEER:
            yield Finding(
                "roster entry",
                Status.FAIL,
                f"the roster lists {config.peer_id!r} as {entry.role.value}, not as a peer",
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
        if entry.address is None:
            yield Finding(
                "roster entry",
                Status.OK,
                f"{config.peer_id} is outbound-only (no address: others reach it through a "
                "relay, and it never aggregates); fingerprint matches the certificate",
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
        usage = self.env.disk_usage(existing_parent(path))
        need, basis = expected_growth(self.config.ledger_url, path, self.now)
        message = (
            f"{size_text(usage.free)} free on {existing_parent(path)}; "
            f"{size_text(need)} needed ({basis})"
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
        if self.roster_ is None or not self.key_ok:
            yield Finding(
                "peers",
                Status.FAIL,
                "not checked: the roster or this site's key/certificate is unusable",
            )
            return
        yield from check_network(self.config, self.roster_, self.env.peer_timeout)
