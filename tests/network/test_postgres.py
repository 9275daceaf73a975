"""The ledger and the patient store on a real PostgreSQL server: any SQLAlchemy URL works.

The test starts its own throwaway server (initdb in a temporary folder, a free port, run as
the ``postgres`` system user since PostgreSQL refuses to run as root). ``make test``
installs Debian's ``postgresql`` package when it is absent; on a machine where that is not
possible the test skips and says why (in CI it fails instead: CI must run it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from peer.data import PatientStore, breast_cancer_feature_names, breast_cancer_records
from peer.kit import free_port
from peer.ledger import AgreedRecord, Ledger, RoundStatus, session_genesis, verify_ledger
from secagg.crypto import sha256
from secagg.testing import test_identities as simulated_identities


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL test cannot run in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        _unavailable("PostgreSQL is not installed (make test installs Debian's postgresql as root)")
    bindir = Path(binaries[-1]).parent
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        _unavailable("no 'postgres' system user to run the server as")
    if os.geteuid() != 0 and os.geteuid() != user.pw_uid:
        _unavailable("starting a PostgreSQL server needs root (to run it as 'postgres')")
    # Not under pytest's tmp folder: that one is private to root, and the server runs as
    # 'postgres', which must be able to reach its data folder.
    base = Path(tempfile.mkdtemp(prefix="hospital-secagg-pg-"))
    base.chmod(0o755)
    data, sockets = base / "data", base / "sockets"
    data.mkdir()
    sockets.mkdir()
    for path in (data, sockets):
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o700)
    runas = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    initdb = subprocess.run(
        [
            *runas,
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        capture_output=True,
        text=True,
    )
    if initdb.returncode != 0:
        raise RuntimeError(f"initdb failed: {initdb.stderr.strip()}")
    port = free_port()
    server = subprocess.Popen(
        [
            *runas,
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-h",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    try:
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres").close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("PostgreSQL did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(base, ignore_errors=True)


def test_ledger_on_postgresql(postgres_url: str) -> None:
    peers = ("hospital-a", "hospital-b", "hospital-c")
    signers, verifiers = simulated_identities(peers, seed=7)
    proposal = '{"session_id":"pg"}'
    with Ledger(postgres_url) as ledger:
        ledger.create()
        ledger.record_proposal(
            "pg", proposal, proposer="op", participants=peers, threshold=2, rounds_planned=3
        )
        ledger.decide_session("pg", accept=True)
        prev = session_genesis(sha256(proposal.encode()))
        for round_ in (1, 2, 3):
            attempt = ledger.start_round(
                "pg", round_, aggregator=peers[round_ % 3], participants=peers
            )
            weights = np.arange(4, dtype="<f4") * round_
            record = AgreedRecord.build(
                "pg",
                round_,
                aggregate_hash=sha256(b"agg", bytes([round_])),
                model_hash=sha256(weights.tobytes()),
                metrics={"accuracy": 0.5 + round_ / 10},
                epsilon={p: 0.1 for p in peers},
                prev_hash=prev,
            )
            signatures = {p: signers[p].sign(record.payload()) for p in peers}
            stored = ledger.append_agreed(
                record, signatures, checkpoint=weights.tobytes(), verifiers=verifiers
            )
            ledger.finish_round("pg", round_, attempt.attempt, status=RoundStatus.AGREED)
            prev = stored.record_hash
    with Ledger(postgres_url) as reopened:
        report = verify_ledger(reopened, verifiers)
        assert report.ok, report
        assert [r.record.round for r in reopened.agreed_records("pg")] == [1, 2, 3]
        checkpoint = reopened.get_checkpoint("pg", 2)
        assert checkpoint is not None
        np.testing.assert_array_equal(np.frombuffer(checkpoint.weights, "<f4"), np.arange(4) * 2)


def test_patient_store_on_postgresql(postgres_url: str) -> None:
    store = PatientStore(postgres_url)
    store.create()
    records = breast_cancer_records(np.random.default_rng(0))
    store.add_records(records, feature_names=breast_cancer_feature_names(), dataset_name="bundled")
    assert store.count() == len(records)
    features, labels = store.load("train")
    assert features.shape[1] == 30
    assert set(np.unique(labels)) <= {0, 1}
    store.dispose()


def _create_database(server_url: str, name: str) -> str:
    import psycopg

    url = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


@pytest.mark.slow
def test_a_peer_keeps_its_data_and_ledger_on_postgresql(postgres_url: str, tmp_path: Path) -> None:
    """A real session in which one hospital's peer stores everything in PostgreSQL."""
    from network_harness import Network
    from test_statistics_network import run_statistics_session

    network = Network.create(tmp_path / "network", 3, start=False)
    data_url = _create_database(postgres_url, "hospital_a_data")
    ledger_url = _create_database(postgres_url, "hospital_a_ledger")
    network.set_storage("hospital-a", data=data_url, ledger=ledger_url)
    try:
        run_statistics_session(network, data_urls={"hospital-a": data_url})
    finally:
        network.stop()
    with Ledger(ledger_url) as ledger:
        assert ledger.url.startswith("postgresql")
        assert [r.record.round for r in ledger.agreed_records("stats-1")] == [1]
