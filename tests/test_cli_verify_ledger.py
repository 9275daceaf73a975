"""`peer verify-ledger` and `ceremony verify-ledger`: one implementation, the same answers.

Both used to have their own copy; `peer verify-ledger`'s let a ledger it could not read end in
a traceback, and opened a missing SQLite file, so creating an empty ledger that "verified".
Every test here runs both commands.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from peer.__main__ import main as peer_main
from peer.config import load_config
from peer.kit import LocalKit
from peer.ledger import Ledger
from scripts.ceremony import main as ceremony_main

PEERS = ("hospital-a", "hospital-b", "hospital-c")
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "peer": peer_main,
    "ceremony": ceremony_main,
}
# How each tool prefixes its one-line errors (unchanged by the merge of the two commands).
PREFIX = {"peer": "peer: error: ", "ceremony": "ceremony verify-ledger: error: "}


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> LocalKit:
    return LocalKit.create(tmp_path_factory.mktemp("kit"), PEERS)


def ledger_file(kit: LocalKit, peer_id: str) -> Path:
    url = load_config(kit.kits[peer_id].config).ledger_url
    assert url.startswith("sqlite:///")
    return Path(url.removeprefix("sqlite:///"))


@pytest.fixture(params=sorted(COMMANDS))
def command(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def verify(command: str, config: Path, *extra: str) -> int:
    return COMMANDS[command](["verify-ledger", "--config", str(config), *extra])


def test_a_peer_that_never_ran_has_no_ledger_and_gets_none(
    kit: LocalKit, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = ledger_file(kit, "hospital-a")
    assert not database.exists()
    assert verify(command, kit.kits["hospital-a"].config) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert f"no ledger at {database} (has this peer run?)" in err
    # Checking must not create the empty ledger that would then "verify".
    assert not database.exists()


def test_an_unreadable_ledger_is_one_line_not_a_traceback(
    kit: LocalKit, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = ledger_file(kit, "hospital-b")
    database.write_bytes(b"")  # an SQLite file without the ledger's tables
    try:
        assert verify(command, kit.kits["hospital-b"].config) == 2
    finally:
        database.unlink()
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
    assert err.startswith(PREFIX[command])
    assert "cannot read the ledger" in err
    assert "no such table" in err


def test_both_commands_report_a_sound_ledger_alike(
    kit: LocalKit, capsys: pytest.CaptureFixture[str]
) -> None:
    with Ledger(f"sqlite:///{ledger_file(kit, 'hospital-c')}") as ledger:
        ledger.create()
    reports = {}
    for command in sorted(COMMANDS):
        assert verify(command, kit.kits["hospital-c"].config, "--json") == 0
        reports[command] = json.loads(capsys.readouterr().out)
    assert reports["peer"] == reports["ceremony"]
    assert reports["peer"]["ok"] is True
    assert reports["peer"]["problems"] == []


def test_a_missing_configuration_is_one_line(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(command, tmp_path / "none.toml") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "none.toml: no such configuration file" in err


def test_a_forged_acceptance_fails_and_a_round_without_evidence_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both commands, on a real kit ledger: hospital-a signed hospital-b's acceptance of the
    # proposal (a problem naming hospital-b), and round 1 has no stored evidence (a warning
    # naming the round, not a silent pass). verify-ledger always has the roster keys.
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from peer.beacon import commit, commitment_signed_bytes
    from peer.ledger import AgreedRecord
    from peer.session import SessionProposal
    from secagg.crypto import sha256, signer_from_private_key

    kit = LocalKit.create(tmp_path / "kit", PEERS)
    signers = {
        p: signer_from_private_key(
            load_pem_private_key(kit.federation.members[p].key.read_bytes(), None)
        )
        for p in PEERS
    }
    proposal = SessionProposal(
        "study", participants=PEERS, rounds=1, threshold=3, payload={"kind": "vector", "length": 4}
    )
    with kit.ledger("hospital-c") as ledger:
        ledger.create()
        ledger.record_proposal(
            "study",
            proposal.document(),
            proposer="hospital-a",
            participants=PEERS,
            threshold=3,
            rounds_planned=1,
        )
        ledger.decide_session("study", accept=True)
        ledger.session_nonce("study", lambda: b"\x01" * 32)
        commitments = {}
        for peer in PEERS:
            commitment = commit(proposal.digest, peer, b"\x02" * 32)
            signer = signers["hospital-a" if peer == "hospital-b" else peer]
            signed = commitment_signed_bytes(proposal.digest, peer, commitment)
            commitments[peer] = (commitment, signer.sign(signed))
        ledger.store_commitments("study", commitments)
        record = AgreedRecord.build(
            "study",
            1,
            aggregate_hash=sha256(b"a"),
            model_hash=sha256(b"m"),
            metrics={},
            epsilon={},
            prev_hash=ledger.session_head("study"),
        )
        ledger.append_agreed(record, {p: signers[p].sign(record.payload()) for p in PEERS})
    reports = {}
    for command in sorted(COMMANDS):
        assert verify(command, kit.kits["hospital-c"].config, "--json") == 1
        reports[command] = json.loads(capsys.readouterr().out)
    assert reports["peer"] == reports["ceremony"]
    (problem,) = reports["peer"]["problems"]
    assert problem == (
        "[acceptance] session 'study': acceptance of the proposal by hospital-b: signature does "
        "not verify under its roster key"
    )
    assert reports["peer"]["warnings"] == [
        "[not-recheckable] session 'study' round 1: no stored evidence: the round's sum cannot "
        "be re-checked"
    ]
