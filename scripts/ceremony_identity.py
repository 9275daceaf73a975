"""``ceremony`` identity subcommands: the CA, CSRs, the roster, revocation, hospital kits.

The order of the ceremony (see :mod:`peer.identity` for what each step checks)::

    ceremony init-ca --dir ca --federation cardio          # once, at the CA: read out the
                                                           # fingerprint it prints
    ceremony request --dir site --peer-id hospital-a ...   # at each hospital: key stays there
    ceremony sign --ca ca --csr hospital-a.csr --out hospital-a.pem
    ceremony roster --ca ca --peer hospital-a.pem=a.example.org:7443 ... --out roster.json
    ceremony kit --ca ca --peer-cert hospital-a.pem --address 0.0.0.0:7443 \\
        --roster roster.json --out kit-hospital-a          # what the CA sends back
    ceremony revoke --ca ca --cert hospital-a.pem          # when a key is lost
    ceremony verify-ledger --config kit-hospital-a/hospital-a.toml

Every command here is a thin wrapper over :mod:`peer.identity` (and :mod:`peer.ledger` for
``verify-ledger``): the checks live in the library, the commands only present them. Library
errors about the inputs (:class:`~peer.identity.IdentityError`, missing or unreadable files)
become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from peer import ledger_check
from peer.cli import EXIT_FAILED, EXIT_OK, UsageError, user_errors
from peer.identity import (
    Role,
    RosterEntry,
    build_roster,
    ca_info,
    create_request,
    current_crl,
    fingerprint,
    init_ca,
    load_certificate,
    load_private_key,
    load_roster,
    normalize_fingerprint,
    read_private_key_pem,
    revoke,
    sign_request,
    signature_path,
    validate_address,
)
from peer.identity._x509 import read_identity

__all__ = ["add_parsers", "csr_fingerprint"]

ROOT_FINGERPRINT_FILE = "ROOT_FINGERPRINT.txt"
REVOCATION_REASONS = [flag.name for flag in x509.ReasonFlags]


def _emit(args: argparse.Namespace, report: dict[str, Any], lines: Sequence[str]) -> None:
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        for line in lines:
            print(line)


def csr_fingerprint(csr: x509.CertificateSigningRequest) -> str:
    """SHA-256 of the DER CSR as ``SHA256:AB:...``, for the hospital and the CA to compare.

    The CSR travels by e-mail or a portal; reading this value out by telephone is how the CA
    knows the file it signs is the one the hospital made.
    """
    der = csr.public_bytes(serialization.Encoding.DER)
    return normalize_fingerprint(hashlib.sha256(der).hexdigest())


def _read_csr(path: Path) -> x509.CertificateSigningRequest | None:
    """The CSR at ``path``, or None when it cannot be parsed (``sign_request`` then says why)."""
    data = path.read_bytes()
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        return None


def _sans(item: x509.Certificate | x509.CertificateSigningRequest) -> tuple[list[str], list[str]]:
    try:
        san = item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (
        list(san.get_values_for_type(x509.DNSName)),
        [str(ip) for ip in san.get_values_for_type(x509.IPAddress)],
    )


def _role(operator: bool) -> Role:
    return Role.OPERATOR if operator else Role.PEER


# --------------------------------------------------------------------------- init-ca


def _add_init_ca(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "init-ca",
        help="create the consortium's root CA (once)",
        description=(
            "Create the federation's root CA in DIR: ca.key (mode 0600, never leaves DIR), "
            "ca.pem, an empty signed crl.pem and issued/. Prints the CA's SHA-256 fingerprint: "
            "read it out to every hospital by a channel other than the one the files travel on."
        ),
    )
    parser.add_argument("--dir", type=Path, required=True, metavar="DIR", help="CA directory")
    parser.add_argument(
        "--federation", required=True, metavar="F", help="federation name, e.g. cardio"
    )
    parser.add_argument(
        "--name", metavar="N", help="CA common name (default: '<federation> root CA')"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_init_ca)


def _cmd_init_ca(args: argparse.Namespace) -> int:
    with user_errors():
        info = init_ca(args.dir, args.federation, args.name or f"{args.federation} root CA")
    report = {
        "directory": str(info.directory),
        "federation": info.federation,
        "common_name": info.common_name,
        "fingerprint": info.fingerprint,
        "certificate": str(info.cert_path),
        "key": str(info.key_path),
        "crl": str(info.crl_path),
    }
    _emit(
        args,
        report,
        [
            f"root CA {info.common_name!r} for federation {info.federation!r} in {info.directory}",
            f"  certificate: {info.cert_path}",
            f"  private key: {info.key_path} (mode 0600; keep it offline, it never leaves here)",
            f"  fingerprint: {info.fingerprint}",
            "Read this fingerprint out to every hospital (telephone, in person): they check it "
            f"against {ROOT_FINGERPRINT_FILE} in their kit before trusting ca.pem.",
        ],
    )
    return EXIT_OK


# --------------------------------------------------------------------------- request


def _add_request(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "request",
        help="at a hospital: generate its key on site and a CSR for the CA",
        description=(
            "Generate this institution's private key (ECDSA P-256, mode 0600, never "
            "overwritten) and a certificate signing request in DIR. Send only the .csr to the "
            "CA; the key never leaves this machine."
        ),
    )
    parser.add_argument("--dir", type=Path, required=True, metavar="DIR", help="where to write")
    parser.add_argument("--peer-id", required=True, metavar="ID", help="e.g. hospital-a")
    parser.add_argument(
        "--institution", required=True, metavar="NAME", help="the institution's legal name"
    )
    parser.add_argument("--federation", required=True, metavar="F", help="the federation name")
    parser.add_argument(
        "--host",
        action="extend",
        nargs="+",
        default=[],
        metavar="H",
        help=(
            "names the peer is reached at: DNS names go into DNS SANs, IP addresses "
            "(10.1.2.3, 2001:db8::5) into IP address SANs"
        ),
    )
    parser.add_argument(
        "--ip",
        action="extend",
        nargs="+",
        default=[],
        metavar="IP",
        help="IP addresses the peer is reached at (IP address SANs)",
    )
    parser.add_argument(
        "--operator",
        action="store_true",
        help="an operator certificate (proposes sessions, runs no peer)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_request)


def _cmd_request(args: argparse.Namespace) -> int:
    with user_errors():
        paths = create_request(
            args.dir,
            args.peer_id,
            args.institution,
            args.federation,
            args.host,
            args.ip,
            role=_role(args.operator),
        )
        csr = _read_csr(paths.csr)
    assert csr is not None  # we just wrote it
    mode = f"{paths.key.stat().st_mode & 0o777:04o}"
    dns, ips = _sans(csr)
    report = {
        "peer_id": args.peer_id,
        "role": _role(args.operator).value,
        "federation": args.federation,
        "key": str(paths.key),
        "key_mode": mode,
        "csr": str(paths.csr),
        "csr_fingerprint": csr_fingerprint(csr),
        "dns": dns,
        "ip": ips,
    }
    _emit(
        args,
        report,
        [
            f"private key: {paths.key} (mode {mode}): keep it here, it never leaves this site",
            f"request:     {paths.csr}",
            f"names:       DNS: {', '.join(dns) or '-'}; IP: {', '.join(ips) or '-'}",
            f"CSR fingerprint: {report['csr_fingerprint']}",
            "Send the .csr file to the consortium CA and read this CSR fingerprint out to them, "
            "so they know the file they sign is yours.",
        ],
    )
    return EXIT_OK


# --------------------------------------------------------------------------- sign


def _add_sign(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sign",
        help="at the CA: check a CSR, show who it is for, and issue the certificate",
        description=(
            "Show the CA's fingerprint and the identity the CSR asks for, then sign it. When "
            "run in a terminal it asks for confirmation (skip with --yes)."
        ),
    )
    parser.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    parser.add_argument("--csr", type=Path, required=True, metavar="FILE", help="the CSR")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="CERT", help="certificate to write"
    )
    parser.add_argument(
        "--operator", action="store_true", help="issue an operator certificate (no peer)"
    )
    parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_sign)


def _cmd_sign(args: argparse.Namespace) -> int:
    with user_errors():
        info = ca_info(args.ca)
        csr = _read_csr(args.csr)
    show = sys.stderr if args.json else sys.stdout
    preview: dict[str, Any] = {}
    if csr is not None:
        with contextlib.suppress(ValueError):  # sign_request gives the precise reason
            identity = read_identity(csr)
            dns, ips = _sans(csr)
            preview = {
                "peer_id": identity.peer_id,
                "institution": identity.institution,
                "federation": identity.federation,
                "role": identity.role.value,
                "dns": dns,
                "ip": ips,
                "csr_fingerprint": csr_fingerprint(csr),
            }
    print(f"CA: {info.common_name!r} ({info.federation}), {info.fingerprint}", file=show)
    if preview:
        print(
            f"CSR {args.csr}: {preview['peer_id']!r} of {preview['institution']!r}, "
            f"federation {preview['federation']!r}, role {preview['role']}",
            file=show,
        )
        print(
            f"  DNS: {', '.join(dns) or '-'}; IP: {', '.join(ips) or '-'}; "
            f"CSR fingerprint {preview['csr_fingerprint']}",
            file=show,
        )
    wanted = _role(args.operator).value
    if preview and preview["role"] != wanted:
        flag = "pass --operator" if preview["role"] == Role.OPERATOR.value else "drop --operator"
        raise UsageError(
            f"{args.csr} asks for a certificate with role {preview['role']}, not {wanted}; "
            f"{flag} if that is intended"
        )
    if not args.yes and sys.stdin.isatty():
        answer = input("Sign this request? Compare the CSR fingerprint with the hospital [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not signed", file=sys.stderr)
            return EXIT_FAILED
    with user_errors():
        cert = sign_request(args.ca, args.csr, args.out, role=_role(args.operator))
    report = {
        **preview,
        "certificate": str(args.out),
        "serial": f"{cert.serial_number:X}",
        "fingerprint": fingerprint(cert),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "ca_fingerprint": info.fingerprint,
    }
    _emit(
        args,
        report,
        [
            f"issued {args.out}: serial {report['serial']}, valid until {report['not_after']}",
            f"  certificate fingerprint: {report['fingerprint']}",
        ],
    )
    return EXIT_OK


# --------------------------------------------------------------------------- roster


def _add_roster(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "roster",
        help="at the CA: sign the list of members (peer id, address, certificate)",
        description=(
            "Build and sign the federation's roster from issued certificates; writes OUT and "
            "OUT.sig. Every peer and operator must be listed; peers need the address others "
            "dial them at."
        ),
    )
    parser.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    parser.add_argument(
        "--peer",
        action="extend",
        nargs="+",
        default=[],
        metavar="CERT=HOST:PORT",
        help="a peer's certificate and its address",
    )
    parser.add_argument(
        "--outbound-only",
        action="extend",
        nargs="+",
        default=[],
        metavar="CERT",
        help=(
            "a peer that accepts no inbound connection (no address): it takes part over "
            "outbound streams through a relay and is never an aggregator"
        ),
    )
    parser.add_argument(
        "--operator",
        action="extend",
        nargs="+",
        default=[],
        metavar="CERT",
        help="an operator's certificate",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="roster.json")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_roster)


def _entry_report(entry: RosterEntry) -> dict[str, Any]:
    return {
        "peer_id": entry.peer_id,
        "institution": entry.institution,
        "role": entry.role.value,
        "address": entry.address,
        "fingerprint": entry.cert_fingerprint_sha256,
    }


def _cmd_roster(args: argparse.Namespace) -> int:
    if not args.peer:
        raise UsageError("a roster needs at least one --peer CERT=HOST:PORT (a reachable peer)")
    entries: list[tuple[str | Path, str | None]] = []
    for spec in args.peer:
        cert, sep, address = spec.partition("=")
        if not sep or not cert or not address:
            raise UsageError(f"--peer {spec}: expected CERT=HOST:PORT, e.g. a.pem=a.org:7443")
        entries.append((Path(cert), address))
    entries += [(Path(cert), None) for cert in args.outbound_only]
    entries += [(Path(cert), None) for cert in args.operator]
    with user_errors():
        signed = build_roster(args.ca, entries)
        roster_path, sig_path = signed.write(args.out)
    roster = signed.roster
    report = {
        "roster": str(roster_path),
        "signature": str(sig_path),
        "federation": roster.federation,
        "version": roster.version,
        "ca_fingerprint": roster.ca_fingerprint,
        "members": [_entry_report(e) for e in roster.entries],
    }
    lines = [f"roster v{roster.version} of {roster.federation!r}: {roster_path} + {sig_path}"]
    lines += [
        f"  {e.role.value:<8} {e.peer_id:<24} {e.address or '-':<28} {e.cert_fingerprint_sha256}"
        for e in roster.entries
    ]
    _emit(args, report, lines)
    return EXIT_OK


# --------------------------------------------------------------------------- revoke


def _add_revoke(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "revoke",
        help="at the CA: revoke a certificate and publish a new CRL",
        description=(
            "Revoke CERT and sign a new crl.pem in the CA directory. Copy it to every peer "
            "(the crl file named in its config); peers refuse revoked certificates."
        ),
    )
    parser.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    parser.add_argument("--cert", type=Path, required=True, metavar="CERT")
    parser.add_argument(
        "--reason",
        default="unspecified",
        metavar="R",
        help="one of: " + ", ".join(REVOCATION_REASONS) + " (default unspecified)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_revoke)


def _cmd_revoke(args: argparse.Namespace) -> int:
    with user_errors():
        cert = load_certificate(args.cert)
        crl = revoke(args.ca, cert, args.reason)
        crl_path = ca_info(args.ca).crl_path
    report = {
        "serial": f"{cert.serial_number:X}",
        "subject": cert.subject.rfc4514_string(),
        "reason": args.reason,
        "crl": str(crl_path),
        "crl_number": crl.number,
        "revoked_serials": sorted(f"{s:X}" for s in crl.serial_numbers),
        "next_update": crl.next_update.isoformat(),
    }
    _emit(
        args,
        report,
        [
            f"revoked {report['subject']} (serial {report['serial']}, reason {args.reason})",
            f"new CRL #{crl.number}: {crl_path}, valid until {report['next_update']}",
            "Copy it to every peer now (the crl file in its config); until then they still "
            "accept the certificate.",
        ],
    )
    return EXIT_OK


# --------------------------------------------------------------------------- kit


def _add_kit(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "kit",
        help="assemble one hospital's folder: config, certificates, roster, CRL",
        description=(
            "Write DIR with what a hospital needs to start its peer: <peer>.toml, its "
            "certificate, ca.pem, roster.json + .sig, crl.pem and ROOT_FINGERPRINT.txt. The "
            "CA never has the hospital's private key: the hospital copies its own <peer>.key "
            "into DIR (or pass --key when assembling the kit on the hospital's machine)."
        ),
    )
    parser.add_argument("--ca", type=Path, required=True, metavar="DIR", help="CA directory")
    parser.add_argument("--peer-cert", type=Path, required=True, metavar="CERT")
    parser.add_argument(
        "--address",
        required=True,
        metavar="HOST:PORT",
        help="where the peer listens (e.g. 0.0.0.0:7443)",
    )
    parser.add_argument("--roster", type=Path, required=True, metavar="roster.json")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument(
        "--key",
        type=Path,
        metavar="KEY",
        help="the hospital's own private key, copied into DIR with mode 0600",
    )
    parser.add_argument(
        "--stage-seconds",
        type=float,
        default=30.0,
        metavar="S",
        help="the peer's default protocol stage timeout (default 30)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=_cmd_kit)


def _copy_key(source: Path, target: Path) -> None:
    """Copy a private key, created 0600 from the start (never readable by others)."""
    pem = read_private_key_pem(source)  # refuses a key others can read
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def _check_key_matches(key_path: Path, cert: x509.Certificate, cert_path: Path) -> None:
    if load_private_key(key_path).public_key() != cert.public_key():
        raise UsageError(f"{key_path} is not the private key of {cert_path}")


def _copy(source: Path, target: Path) -> None:
    """Copy a public file, unless ``target`` already is ``source`` (kit built in place)."""
    if target.exists() and target.samefile(source):
        return
    shutil.copyfile(source, target)


def _cmd_kit(args: argparse.Namespace) -> int:
    from peer.kit import write_peer_config

    if args.stage_seconds <= 0:
        raise UsageError(f"--stage-seconds must be positive, not {args.stage_seconds}")
    with user_errors():
        validate_address(args.address)
        info = ca_info(args.ca)
        cert = load_certificate(args.peer_cert)
        roster = load_roster(args.roster, info.certificate)
        crl = current_crl(args.ca)
    mine = fingerprint(cert)
    entry = next((e for e in roster.entries if e.cert_fingerprint_sha256 == mine), None)
    if entry is None:
        raise UsageError(
            f"{args.peer_cert} ({cert.subject.rfc4514_string()}) is not in roster {args.roster}; "
            "add it with `ceremony roster` first"
        )
    if entry.role is not Role.PEER:
        raise UsageError(f"{args.peer_cert} is an operator certificate; operators run no peer")
    if crl.revoked(cert.serial_number) is not None:
        raise UsageError(f"{args.peer_cert} (serial {cert.serial_number:X}) is revoked")
    peer_id = entry.peer_id
    out: Path = args.out
    key_target = out / f"{peer_id}.key"
    with user_errors():
        # Every check before the first write: a refused kit leaves nothing half made.
        if args.key is not None:
            _check_key_matches(args.key, cert, args.peer_cert)
        if key_target.exists():
            _check_key_matches(key_target, cert, args.peer_cert)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy(args.peer_cert, out / f"{peer_id}.pem")
        _copy(info.cert_path, out / "ca.pem")
        _copy(args.roster, out / "roster.json")
        _copy(signature_path(args.roster), out / "roster.json.sig")
        (out / "crl.pem").write_bytes(crl.pem())
        (out / ROOT_FINGERPRINT_FILE).write_text(
            f"{info.fingerprint}\n"
            "Check this against the fingerprint the consortium CA read out to you before "
            "starting the peer.\n",
            encoding="utf-8",
        )
        if args.key is not None and not key_target.exists():
            _copy_key(args.key, key_target)
        config = out / f"{peer_id}.toml"
        kept_config = config.exists()
        if not kept_config:
            operators = [e.peer_id for e in roster.entries if e.role is Role.OPERATOR]
            write_peer_config(
                config,
                peer_id,
                args.address,
                stage_seconds=args.stage_seconds,
                policy={"allowed_operators": operators},
            )
    has_key = key_target.exists()
    report = {
        "peer_id": peer_id,
        "directory": str(out),
        "config": str(config),
        "config_kept": kept_config,
        "address": args.address,
        "roster_address": entry.address,
        "root_fingerprint": info.fingerprint,
        "key": str(key_target) if has_key else None,
        "key_present": has_key,
        "files": sorted(p.name for p in out.iterdir()),
    }
    lines = [
        f"kit for {peer_id} in {out}:",
        *(f"  {name}" for name in report["files"]),
        f"root fingerprint: {info.fingerprint} (check it out of band)",
    ]
    if kept_config:
        lines.append(f"kept the existing {config.name} (its policy may have been edited)")
    if has_key:
        lines.append(f"private key: {key_target} (mode 0600, matches the certificate)")
    else:
        lines.append(
            f"The private key is NOT in this kit: the CA never had it. Copy {peer_id}.key "
            f"(made by `ceremony request`, mode 0600) into {out}."
        )
    lines.append(f"then review [policy] in {config.name} and run: peer start --config {config}")
    _emit(args, report, lines)
    return EXIT_OK


# --------------------------------------------------------------------------- verify-ledger


def _add_verify_ledger(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "verify-ledger",
        help="check a peer's ledger: hash chains, signatures, checkpoints",
        description=(
            "Check the ledger of the peer configured in PEER.toml against its roster (the same "
            "check as `peer verify-ledger`). Exit 0 when no problem is found, 1 otherwise."
        ),
    )
    ledger_check.add_arguments(parser)


# --------------------------------------------------------------------------- registration


def add_parsers(subparsers: Any) -> None:
    """Register the identity subcommands on ``ceremony``'s subparsers."""
    _add_init_ca(subparsers)
    _add_request(subparsers)
    _add_sign(subparsers)
    _add_roster(subparsers)
    _add_revoke(subparsers)
    _add_kit(subparsers)
    _add_verify_ledger(subparsers)
