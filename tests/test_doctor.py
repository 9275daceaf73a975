"""``peer doctor``: a healthy kit passes, and each thing a site gets wrong is named.

Peers are real mTLS gRPC servers (``peer.tls.create_server``) on 127.0.0.1, run on an
event loop in a background thread while doctor runs in the test's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from peer.__main__ import main
from peer.doctor import (
    CERT_WARN_DAYS,
    DiskUsage,
    Environment,
    Report,
    Status,
    run_doctor,
)
from peer.identity import load_certificate, load_crl, refresh_crl
from peer.kit import LocalKit
from peer.ledger import Ledger
from peer.tls import Authenticator, TLSFiles, create_server

PEERS = ("hospital-a", "hospital-b", "hospital-c")
ME = "hospital-a"
PLENTY = DiskUsage(total=1 << 40, used=0, free=100 << 30)


def fake_env(**changes: object) -> Environment:
    """No real TensorFlow import (slow), a synchronised clock, plenty of disk."""
    env = Environment(
        import_probe=(sys.executable, "-c", "print('2.99.0')"),
        ntp_synchronized=lambda: True,
        disk_usage=lambda _path: PLENTY,
        peer_timeout=5.0,
    )
    return replace(env, **changes)  # type: ignore[arg-type]


@pytest.fixture
def kit(tmp_path: Path) -> LocalKit:
    return LocalKit.create(tmp_path / "fed", PEERS)


def config_of(kit: LocalKit, peer_id: str = ME) -> Path:
    return kit.kits[peer_id].config


@contextlib.contextmanager
def serving(
    kit: LocalKit,
    peer_ids: Sequence[str],
    authenticators: Mapping[str, Authenticator] | None = None,
) -> Iterator[None]:
    """Run the peers' mTLS servers (health service only) at their roster addresses."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: list[asyncio.Event] = []
    failure: list[BaseException] = []

    async def run() -> None:
        stop.append(asyncio.Event())
        async with contextlib.AsyncExitStack() as stack:
            for peer_id in peer_ids:
                member = kit.federation.members[peer_id]
                directory = kit.kits[peer_id].directory
                auth = (authenticators or {}).get(peer_id) or Authenticator.from_files(
                    directory / "ca.pem", directory / "roster.json", directory / "crl.pem"
                )
                files = TLSFiles(member.cert, member.key, member.ca)
                await stack.enter_async_context(
                    create_server(kit.kits[peer_id].address, files, auth, grace=0.1)
                )
            started.set()
            await stop[0].wait()

    def thread_main() -> None:
        try:
            loop.run_until_complete(run())
        except BaseException as error:
            failure.append(error)
            started.set()
        finally:
            loop.close()

    thread = threading.Thread(target=thread_main, daemon=True)
    thread.start()
    assert started.wait(30), "servers did not start"
    if failure:
        raise failure[0]
    try:
        yield
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(30)


def statuses(report: Report) -> dict[str, set[Status]]:
    found: dict[str, set[Status]] = {}
    for finding in report.findings:
        found.setdefault(finding.check, set()).add(finding.status)
    return found


def only(report: Report, check: str) -> str:
    """The message and action of ``check``'s one finding, for asserting on the text."""
    [finding] = report.by_check(check)
    return f"{finding.message} -> {finding.action}"


# --------------------------------------------------------------------------- healthy


def test_healthy_site_passes_and_says_what_it_could_not_measure(kit: LocalKit) -> None:
    with serving(kit, PEERS):
        report = run_doctor(config_of(kit), fake_env())
    assert report.ok, report.to_text()
    assert report.exit_code == 0
    warnings = {f.check for f in report.findings if f.status is Status.WARN}
    # Skew is honestly reported as not measured; everything else is OK.
    assert warnings == {"clock skew"}, report.to_text()
    assert "not measured" in only(report, "clock skew")
    checks = statuses(report)
    for check in (
        "config",
        "private key",
        "CA certificate",
        "certificate",
        "roster",
        "CRL",
        "roster entry",
        "data database",
        "ledger database",
        "disk space",
        "tensorflow",
        "peer hospital-b",
        "peer hospital-c",
        "inbound",
    ):
        assert checks[check] == {Status.OK}, (check, report.to_text())
    assert "2.99.0" in only(report, "tensorflow")


def test_cli_prints_json_and_exits_non_zero_on_fail(
    kit: LocalKit, capsys: pytest.CaptureFixture[str]
) -> None:
    # No peer is running: every peer is a WARN, none reachable is a FAIL.
    code = main(["doctor", "--config", str(config_of(kit)), "--json"])
    document = json.loads(capsys.readouterr().out)
    assert code == 1
    assert document["ok"] is False
    assert document["peer"] == ME
    by_check = {c["check"]: c for c in document["checks"]}
    assert by_check["peer hospital-b"]["status"] == "WARN"
    assert by_check["peers"]["status"] == "FAIL"
    assert by_check["inbound"]["status"] == "WARN"
    assert "not running" in by_check["inbound"]["message"]
    assert {"check", "status", "message", "action"} <= set(by_check["certificate"])


def test_unparseable_config_fails_alone(tmp_path: Path) -> None:
    broken = tmp_path / "x.toml"
    broken.write_text("peer_id = \n", encoding="utf-8")
    report = run_doctor(broken, fake_env())
    assert [(f.check, f.status) for f in report.findings] == [("config", Status.FAIL)]
    assert report.exit_code == 1
    assert "not valid TOML" in report.findings[0].message


# --------------------------------------------------------------------------- files


def test_world_readable_key_fails_with_the_chmod_that_fixes_it(kit: LocalKit) -> None:
    key = kit.federation.members[ME].key
    key.chmod(0o644)
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert statuses(report)["private key"] == {Status.FAIL}
    assert f"chmod 600 {key}" in only(report, "private key")
    # Without a usable key no peer can be dialled: said, not silently skipped.
    assert statuses(report)["peers"] == {Status.FAIL}


def test_key_owned_by_another_user_warns(kit: LocalKit) -> None:
    with serving(kit, PEERS):
        report = run_doctor(config_of(kit), fake_env(uid=os.geteuid() + 1))
    assert Status.WARN in statuses(report)["private key"]
    assert report.exit_code == 0


def test_kit_writable_by_others_fails(kit: LocalKit) -> None:
    directory = kit.kits[ME].directory
    directory.chmod(0o777)
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    [finding] = report.by_check("permissions")
    assert finding.status is Status.FAIL
    assert str(directory) in finding.message
    assert finding.action == f"chmod go-w {directory}"


# --------------------------------------------------------------------------- certificates


def test_expired_certificate_fails(kit: LocalKit) -> None:
    cert = load_certificate(kit.federation.members[ME].cert)
    later = cert.not_valid_after_utc + timedelta(days=1)
    report = run_doctor(config_of(kit), fake_env(clock=lambda: later))
    assert report.exit_code == 1
    assert statuses(report)["certificate"] == {Status.FAIL}
    assert "expired" in only(report, "certificate")


def test_certificate_near_expiry_warns_with_days_left(kit: LocalKit) -> None:
    cert = load_certificate(kit.federation.members[ME].cert)
    soon = cert.not_valid_after_utc - timedelta(days=CERT_WARN_DAYS - 10, hours=1)
    # A fresh CRL for that date, so that only the certificate is the matter.
    directory = kit.kits[ME].directory
    crl = refresh_crl(kit.federation.ca.directory, clock=lambda: soon)
    (directory / "crl.pem").write_bytes(crl.pem())
    report = run_doctor(config_of(kit), fake_env(clock=lambda: soon))
    assert statuses(report)["certificate"] == {Status.WARN}
    assert "(20 days left)" in only(report, "certificate")
    assert "renew" in only(report, "certificate")
    assert statuses(report)["CRL"] == {Status.OK}


def test_certificate_from_another_ca_fails(kit: LocalKit, tmp_path: Path) -> None:
    other = LocalKit.create(tmp_path / "other", ["hospital-a", "hospital-b"])
    mine = kit.kits[ME].directory / f"{ME}.pem"
    mine.write_bytes(other.federation.members[ME].cert.read_bytes())
    (kit.kits[ME].directory / f"{ME}.key").write_bytes(
        other.federation.members[ME].key.read_bytes()
    )
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert "not issued by the CA" in only(report, "certificate")


def test_swapped_ca_certificate_does_not_match_the_root_fingerprint(
    kit: LocalKit, tmp_path: Path
) -> None:
    other = LocalKit.create(tmp_path / "other", ["hospital-a", "hospital-b"])
    (kit.kits[ME].directory / "ca.pem").write_bytes(other.federation.ca.cert_path.read_bytes())
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert "ROOT_FINGERPRINT.txt" in only(report, "CA certificate")


# --------------------------------------------------------------------------- roster and CRL


def test_tampered_roster_fails(kit: LocalKit) -> None:
    roster = kit.kits[ME].directory / "roster.json"
    # An attacker on the file system points hospital-b's address at themselves.
    text = roster.read_text(encoding="utf-8")
    address = kit.kits["hospital-b"].address
    roster.write_text(text.replace(address, "10.6.6.6:7443"), encoding="utf-8")
    assert roster.read_text(encoding="utf-8") != text
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert statuses(report)["roster"] == {Status.FAIL}
    assert statuses(report)["roster entry"] == {Status.FAIL}


def test_stale_crl_fails(kit: LocalKit) -> None:
    crl = load_crl(kit.kits[ME].directory / "crl.pem", kit.federation.ca.certificate)
    later = crl.next_update + timedelta(hours=1)
    report = run_doctor(config_of(kit), fake_env(clock=lambda: later))
    assert report.exit_code == 1
    assert statuses(report)["CRL"] == {Status.FAIL}
    assert "stale" in only(report, "CRL")


def test_crl_near_next_update_warns(kit: LocalKit) -> None:
    crl = load_crl(kit.kits[ME].directory / "crl.pem", kit.federation.ca.certificate)
    soon = crl.next_update - timedelta(days=2)
    report = run_doctor(config_of(kit), fake_env(clock=lambda: soon))
    assert statuses(report)["CRL"] == {Status.WARN}


def test_revoked_own_certificate_fails(kit: LocalKit) -> None:
    crl = kit.federation.revoke(ME)
    (kit.kits[ME].directory / "crl.pem").write_bytes(crl.pem())
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert any("is revoked" in f.message for f in report.by_check("CRL"))


def test_missing_own_roster_entry_fails(kit: LocalKit) -> None:
    fed = kit.federation
    addresses = {p: kit.kits[p].address for p in PEERS}
    fed.publish_roster(addresses, include=["hospital-b", "hospital-c", kit.operator])
    assert fed.roster_path is not None
    for name in ("roster.json", "roster.json.sig"):
        (kit.kits[ME].directory / name).write_bytes((fed.directory / name).read_bytes())
    report = run_doctor(config_of(kit), fake_env())
    assert report.exit_code == 1
    assert statuses(report)["roster"] == {Status.OK}
    assert statuses(report)["roster entry"] == {Status.FAIL}
    assert "'hospital-a' is not in roster version" in only(report, "roster entry")


# --------------------------------------------------------------------------- storage


def test_unwritable_ledger_fails_and_the_probe_changes_nothing(kit: LocalKit) -> None:
    directory = kit.kits[ME].directory
    ledger_file = directory / "ledger.db"
    with Ledger(f"sqlite:///{ledger_file}") as ledger:
        ledger.create()
    before = sqlite3.connect(ledger_file).execute("SELECT name FROM sqlite_master").fetchall()
    config = config_of(kit)
    text = config.read_text(encoding="utf-8")
    # Read-only SQLite: the same file through SQLite's URI form with mode=ro (root ignores
    # file permissions, so this is how a test makes it unwritable).
    config.write_text(
        text.replace(
            'ledger = "sqlite:///ledger.db"',
            f'ledger = "sqlite:///file:{ledger_file}?mode=ro&uri=true"',
        ),
        encoding="utf-8",
    )
    report = run_doctor(config, fake_env())
    assert report.exit_code == 1
    assert statuses(report)["ledger database"] == {Status.FAIL}
    assert "readonly" in only(report, "ledger database")
    # The writable data database was probed too: OK, and no probe table was left behind.
    config.write_text(text, encoding="utf-8")
    report = run_doctor(config, fake_env())
    assert statuses(report)["ledger database"] == {Status.OK}
    after = sqlite3.connect(ledger_file).execute("SELECT name FROM sqlite_master").fetchall()
    assert after == before


def test_ledger_in_a_missing_folder_fails(kit: LocalKit, tmp_path: Path) -> None:
    config = config_of(kit)
    missing = tmp_path / "no" / "such" / "ledger.db"
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            'ledger = "sqlite:///ledger.db"', f'ledger = "sqlite:///{missing}"'
        ),
        encoding="utf-8",
    )
    report = run_doctor(config, fake_env())
    assert statuses(report)["ledger database"] == {Status.FAIL}
    assert str(missing.parent) in only(report, "ledger database")


@pytest.mark.parametrize(
    ("free", "expected"),
    [(50 << 20, Status.FAIL), (500 << 20, Status.WARN), (5 << 30, Status.OK)],
)
def test_free_disk_space_against_the_expected_growth(
    kit: LocalKit, free: int, expected: Status
) -> None:
    usage = DiskUsage(total=10 << 30, used=0, free=free)
    report = run_doctor(config_of(kit), fake_env(disk_usage=lambda _path: usage))
    assert statuses(report)["disk space"] == {expected}, only(report, "disk space")


def test_growth_is_extrapolated_from_the_ledgers_history(kit: LocalKit) -> None:
    from peer.doctor import MIN_FREE_BYTES, expected_growth

    ledger_file = kit.kits[ME].directory / "ledger.db"
    url = f"sqlite:///{ledger_file}"
    assert expected_growth(url, ledger_file, datetime.now(UTC))[0] == MIN_FREE_BYTES
    with Ledger(url) as ledger:
        ledger.create()
    # Pretend the ledger has grown to 200 MiB in the 10 days since its first session.
    started = datetime.now(UTC) - timedelta(days=10)
    with Ledger(url, clock=lambda: started) as ledger:
        ledger.record_proposal(
            "s1", '{"x": 1}', proposer="hospital-b", participants=PEERS, threshold=2,
            rounds_planned=1,
        )  # fmt: skip
    with ledger_file.open("ab") as handle:
        handle.truncate(200 << 20)
    need, basis = expected_growth(url, ledger_file, datetime.now(UTC))
    assert need == pytest.approx((200 << 20) / 10 * 90, rel=0.02)
    assert "10 days" in basis


# --------------------------------------------------------------------------- runtime


def test_broken_tensorflow_fails_when_the_policy_trains(kit: LocalKit) -> None:
    probe = (sys.executable, "-c", "import tensorflow_that_is_not_there")
    report = run_doctor(config_of(kit), fake_env(import_probe=probe))
    assert statuses(report)["tensorflow"] == {Status.FAIL}
    assert "ModuleNotFoundError" in only(report, "tensorflow")


def test_hanging_tensorflow_import_is_cut_off(kit: LocalKit) -> None:
    probe = (sys.executable, "-c", "import time; time.sleep(60)")
    report = run_doctor(config_of(kit), fake_env(import_probe=probe, import_timeout=1.0))
    assert statuses(report)["tensorflow"] == {Status.FAIL}
    assert "did not finish within 1 s" in only(report, "tensorflow")


def test_unsynchronised_clock_warns(kit: LocalKit) -> None:
    report = run_doctor(config_of(kit), fake_env(ntp_synchronized=lambda: False))
    assert statuses(report)["clock"] == {Status.WARN}


# --------------------------------------------------------------------------- network


def test_unreachable_peer_warns_but_a_reachable_majority_passes(kit: LocalKit) -> None:
    with serving(kit, [ME, "hospital-b"]):
        report = run_doctor(config_of(kit), fake_env(peer_timeout=3.0))
    assert statuses(report)["peer hospital-b"] == {Status.OK}
    assert statuses(report)["peer hospital-c"] == {Status.WARN}
    assert kit.kits["hospital-c"].address in only(report, "peer hospital-c")
    assert report.exit_code == 0


def test_peer_that_refuses_our_certificate_fails(kit: LocalKit) -> None:
    # hospital-b still runs a roster without us (e.g. it missed the new roster).
    fed = kit.federation
    addresses = {p: kit.kits[p].address for p in PEERS}
    fed.publish_roster(addresses, include=["hospital-b", "hospital-c", kit.operator])
    assert fed.roster_path is not None
    stale = Authenticator.from_files(fed.ca.cert_path, fed.roster_path, fed.ca.crl_path)
    with serving(kit, [ME, "hospital-b", "hospital-c"], {"hospital-b": stale}):
        report = run_doctor(config_of(kit), fake_env())
    assert statuses(report)["peer hospital-b"] == {Status.FAIL}
    assert "refused our certificate" in only(report, "peer hospital-b")
    assert "current roster" in only(report, "peer hospital-b")
    assert statuses(report)["peer hospital-c"] == {Status.OK}
    assert report.exit_code == 1


def test_port_taken_by_something_else_fails_inbound(kit: LocalKit) -> None:
    import socket

    host, _, port = kit.kits[ME].address.rpartition(":")
    with socket.socket() as squatter, serving(kit, ["hospital-b", "hospital-c"]):
        squatter.bind((host, int(port)))
        squatter.listen()
        report = run_doctor(config_of(kit), fake_env(peer_timeout=2.0))
    assert statuses(report)["inbound"] == {Status.FAIL}
    assert "does not answer as this peer" in only(report, "inbound")


# --------------------------------------------------------------------------- outbound-only


@pytest.fixture
def outbound_kit(tmp_path: Path) -> LocalKit:
    return LocalKit.create(tmp_path / "fed", PEERS, outbound_only=[ME])


def test_outbound_only_site_skips_inbound_and_checks_its_relay(outbound_kit: LocalKit) -> None:
    with serving(outbound_kit, ["hospital-b", "hospital-c"]):
        report = run_doctor(config_of(outbound_kit), fake_env(peer_timeout=3.0))
    assert statuses(report)["inbound"] == {Status.OK}, report.to_text()
    assert "outbound-only: inbound check skipped; relay reachable" in only(report, "inbound")
    assert statuses(report)["roster entry"] == {Status.OK}
    assert "outbound-only" in only(report, "roster entry")
    assert report.exit_code == 0, report.to_text()


def test_outbound_only_site_without_a_reachable_relay_fails(outbound_kit: LocalKit) -> None:
    report = run_doctor(config_of(outbound_kit), fake_env(peer_timeout=2.0))
    assert statuses(report)["inbound"] == {Status.FAIL}
    assert "no relay reachable" in only(report, "inbound")
    assert report.exit_code == 1


def test_an_outbound_only_peer_is_not_dialled_by_the_others(outbound_kit: LocalKit) -> None:
    with serving(outbound_kit, ["hospital-b", "hospital-c"]):
        report = run_doctor(config_of(outbound_kit, "hospital-b"), fake_env(peer_timeout=3.0))
    assert statuses(report)[f"peer {ME}"] == {Status.OK}
    assert "reached through a relay" in only(report, f"peer {ME}")
    assert statuses(report)["inbound"] == {Status.OK}, report.to_text()
