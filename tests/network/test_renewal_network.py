"""Renewing one hospital's certificate in the middle of a multi-round session.

Real peer processes: hospital-b gets a new key and certificate (``request --renew``, signed
by the CA) while a 10-round session runs. The CA publishes a roster listing the new
certificate (the old one stays listed as previous); the other peers install it (SIGHUP),
then hospital-b installs its new pair and is sent SIGHUP. Nobody restarts. The
session completes, b's later rounds are signed with its new key, every ledger verifies
(records signed with the old key included) and holds every site's signed acceptance of
each session (issue 14), and once the old certificate is revoked a
caller presenting it is refused while the new one is served.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from network_harness import Network

from dashboard.data import ACCEPTED, acceptance_table
from peer.channels import method_path
from peer.identity import load_certificate, verifier_for
from peer.tls import TLSFiles, peer_channel
from peer.wire import peer_pb2 as pb

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

B = "hospital-b"
ROUNDS = 20


def _set_limits(network: Network, peer: str, **limits: float) -> None:
    config = network.kit.kits[peer].config
    lines = "".join(f"{key} = {value}\n" for key, value in limits.items())
    config.write_text(config.read_text("utf-8") + f"\n[limits]\n{lines}", encoding="utf-8")


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _signal(network: Network, peer: str) -> None:
    process = network.peers[peer].process
    assert process is not None
    process.send_signal(signal.SIGHUP)


def _logged(network: Network, peer: str, text: str) -> bool:
    return text in network.peers[peer].log_path.read_text("utf-8")


async def _status_as(network: Network, files: TLSFiles, at: str) -> tuple[grpc.StatusCode, str]:
    channel = peer_channel(network.kit.federation.roster, at, files)
    call = channel.unary_unary(
        method_path("Status"),
        request_serializer=pb.SessionRef.SerializeToString,
        response_deserializer=pb.SessionStatus.FromString,
    )
    try:
        await call(pb.SessionRef(session_id="none"), timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    finally:
        await channel.close(None)
    return grpc.StatusCode.OK, ""


def test_a_hospital_renews_its_certificate_mid_session(tmp_path: Path) -> None:
    network = Network.create(tmp_path / "net", 3, length=20_000, start=False)
    for peer in network.peers:
        # Files are taken on SIGHUP here (polling would also find them, less predictably).
        _set_limits(network, peer, trust_poll_seconds=3600)
        network.peers[peer].start()
    fed = network.kit.federation
    site = network.kit.kits[B].directory
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    old_cert = Path(shutil.copy(site / f"{B}.pem", old_dir / f"{B}.pem"))
    old_key = Path(shutil.copy(site / f"{B}.key", old_dir / f"{B}.key"))
    old_key.chmod(0o600)

    proposal = network.proposal("s1", rounds=ROUNDS)
    result: dict[str, Any] = {}
    session = threading.Thread(
        target=lambda: result.update(network.run_session(proposal, timeout=300)), daemon=True
    )
    try:
        session.start()
        with network.ledger(B) as ledger:
            _wait_for(lambda: ledger.last_agreed_round("s1") >= 1, 120, "round 1 agreed")
        # The renewal: a new key and certificate for b, a roster listing it for everyone.
        new = fed.renew(B)
        new_cert = load_certificate(new.cert)
        addresses = {p: network.kit.kits[p].address for p in network.peers}
        fed.publish_roster(addresses)
        assert fed.roster_path is not None
        for peer in network.peers:
            kit = network.kit.kits[peer].directory
            for name in ("roster.json", "roster.json.sig"):
                shutil.copy(fed.roster_path.with_name(name), kit / f".{name}.new")
                (kit / f".{name}.new").replace(kit / name)  # atomic, as a site would
        # As the README says: the roster first, everywhere (here on SIGHUP, so that the
        # session is still running when b switches; polling is tested in test_renewal.py)...
        version = fed.roster.version
        for peer in ("hospital-a", "hospital-c"):
            _signal(network, peer)
        for peer in ("hospital-a", "hospital-c"):
            _wait_for(
                functools.partial(_logged, network, peer, f"installed roster version {version}"),
                60,
                f"{peer} to install roster version {version}",
            )
        # ...then b installs its pair by rename (key first; a half-installed pair is refused).
        new.key.replace(site / f"{B}.key")
        new.cert.replace(site / f"{B}.pem")
        renewed_at = time.monotonic()
        _signal(network, B)
        session.join(300)
        assert not session.is_alive(), network.logs()
        states = {getattr(s, "state", repr(s)) for s in result.values()}
        assert states == {"finished"}, network.logs()

        # Every round agreed everywhere; b signed the first rounds with its old key and,
        # from some round on, every round with its new key.
        old_verifier = verifier_for(load_certificate(old_cert))
        new_verifier = verifier_for(new_cert)
        keys = []
        for stored in network.records("hospital-a", "s1"):
            payload, signature = stored.record.payload(), stored.signatures[B]
            keys.append(
                "new"
                if new_verifier.verify(signature, payload)
                else "old"
                if old_verifier.verify(signature, payload)
                else "?"
            )
        assert len(keys) == ROUNDS, network.logs()
        assert "?" not in keys, (keys, network.logs())
        assert "new" in keys, (keys, network.logs())  # b signed with its new key in the end
        switch = keys.index("new")
        assert keys == ["old"] * switch + ["new"] * (ROUNDS - switch), keys
        assert switch >= 1
        print(f"b signed rounds 1-{switch} with the old key, {switch + 1}-{ROUNDS} with the new")
        for peer in network.peers:
            assert [r.record.round for r in network.records(peer, "s1")] == list(
                range(1, ROUNDS + 1)
            )
            assert network.verify(peer) == [], (peer, network.verify(peer))
        log = network.peers[B].log_path.read_text("utf-8")
        assert "installed certificate" in log
        assert time.monotonic() - renewed_at < 300

        # The old certificate is revoked: presenting it is refused, the new one is served.
        crl = fed.revoke_certificate(old_cert)
        for peer in network.peers:
            kit = network.kit.kits[peer].directory
            (kit / ".crl.new").write_bytes(crl.pem())
            (kit / ".crl.new").replace(kit / "crl.pem")
        for peer in network.peers:
            _signal(network, peer)
        ca = network.kit.kits["hospital-a"].directory / "ca.pem"
        refused: list[tuple[grpc.StatusCode, str]] = []

        def old_certificate_refused() -> bool:
            # a reloads on SIGHUP; under load that may take a moment.
            refused[:] = [
                asyncio.run(_status_as(network, TLSFiles(old_cert, old_key, ca), "hospital-a"))
            ]
            return refused[0][0] is grpc.StatusCode.UNAUTHENTICATED

        _wait_for(old_certificate_refused, 60, "the old certificate to be refused")
        code, details = refused[0]
        assert "revoked" in details
        code, _ = asyncio.run(
            _status_as(network, TLSFiles(site / f"{B}.pem", site / f"{B}.key", ca), "hospital-a")
        )
        assert code is grpc.StatusCode.NOT_FOUND  # served: there is no session "none"
        # And the federation goes on with the renewed hospital, nobody restarted.
        statuses = network.run_session(network.proposal("s2", rounds=1), expect_all=True)
        assert {getattr(s, "state", repr(s)) for s in statuses.values()} == {"finished"}
        [record] = network.records("hospital-c", "s2")
        assert new_verifier.verify(record.signatures[B], record.record.payload())
        # Every ledger holds every site's signed acceptance of both sessions, and they
        # verify with the roster's keys: b accepted s1 with its old key, s2 with its new one.
        verifiers = fed.roster.verifiers()
        for peer in network.peers:
            with network.ledger(peer) as ledger:
                for sid in ("s1", "s2"):
                    info, state = ledger.session(sid), ledger.beacon_state(sid)
                    assert info is not None
                    assert state is not None
                    table = acceptance_table(info, state.commitments, verifiers)
                    assert table.column("status") == [ACCEPTED] * 3, (peer, sid, table)
    finally:
        network.stop()
