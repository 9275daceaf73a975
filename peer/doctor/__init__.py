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
- the clock: whether the kernel reports it NTP-synchronised, and its skew against every
  reachable roster peer (their ``Clock`` service; WARN over 5 s, FAIL over 60 s, allowing
  for the round trip; see ``_clock``);
- every other roster peer answers an mTLS health check from here; our own roster address
  answers one too (inbound, seen from this machine: the path through the site's firewall is
  checked by the *other* sites' doctor, whose outbound check is our inbound one).

Everything outside the process (clock, disk, subprocess, uid, timeouts) comes in through
:class:`Environment`, so tests fix it.

Modules: ``_report`` (findings and the report), ``_environment`` (the injected edges),
``_checks`` (the checks, in order), ``_storage`` (databases, disk), ``_network`` (peers) and
``_clock`` (skew).
"""

from __future__ import annotations

from pathlib import Path

from peer.config import ConfigFileError, load_config
from peer.doctor._checks import CERT_WARN_DAYS, CRL_WARN_DAYS, SiteChecks
from peer.doctor._clock import SKEW_FAIL_SECONDS, SKEW_WARN_SECONDS
from peer.doctor._environment import DiskUsage, Environment, kernel_ntp_synchronized
from peer.doctor._report import Finding, Report, Status
from peer.doctor._storage import (
    CRITICAL_FREE_BYTES,
    GROWTH_HORIZON_DAYS,
    MIN_FREE_BYTES,
    expected_growth,
    probe_database,
)

__all__ = [
    "CERT_WARN_DAYS",
    "CRITICAL_FREE_BYTES",
    "CRL_WARN_DAYS",
    "GROWTH_HORIZON_DAYS",
    "MIN_FREE_BYTES",
    "SKEW_FAIL_SECONDS",
    "SKEW_WARN_SECONDS",
    "DiskUsage",
    "Environment",
    "Finding",
    "Report",
    "Status",
    "expected_growth",
    "kernel_ntp_synchronized",
    "probe_database",
    "run_doctor",
]


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
    state = SiteChecks(config, env)
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
