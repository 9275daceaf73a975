"""peer.operator.follow: what the operator shows is what the peers' ledgers agree on.

The client's ``records`` call is replaced by the ledgers' answers (no network): each test
gives every peer's ledger its records, signed with the members' real keys, and checks the
rows that ``collect_rounds`` makes of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from peer.codec import record_to_proto
from peer.identity import load_signer
from peer.identity.testing import LocalFederation
from peer.ledger import AgreedRecord
from peer.operator import OperatorClient, RoundRow, SessionOutcome, collect_rounds
from peer.tls import PeerUnreachableError
from peer.wire import peer_pb2 as pb

PEERS = ("hospital-a", "hospital-b", "hospital-c")
SESSION = "s-1"
# What each peer's ledger answers to ``Records``: its records, or the transport's error.
Held = Mapping[str, Sequence[pb.AgreedRecord] | Exception]


@dataclass
class LedgerAnswers(OperatorClient):
    """An operator client whose ``Records`` answers come from ``held`` instead of the peers."""

    held: Held = field(default_factory=dict)

    async def records(self, session_id: str, peer: str) -> list[pb.AgreedRecord]:
        assert session_id == SESSION
        answer = self.held[peer]
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> LocalFederation:
    return LocalFederation.create(tmp_path_factory.mktemp("fed"), peers=PEERS, operators=["op"])


def client(
    fed: LocalFederation, held: Mapping[str, Sequence[pb.AgreedRecord] | Exception]
) -> LedgerAnswers:
    op = fed.members["op"]
    assert fed.roster_path is not None
    answers = LedgerAnswers.from_files("op", op.cert, op.key, op.ca, fed.roster_path)
    answers.held = held
    return answers


def record(round_: int, summed: int, prev: bytes = b"\0" * 32) -> AgreedRecord:
    return AgreedRecord.build(
        SESSION,
        round_,
        aggregate_hash=bytes([summed]) * 32,
        model_hash=b"\0" * 32,
        metrics={"summed": summed, "aggregator": "hospital-a"},
        epsilon={p: 0.0 for p in PEERS},
        prev_hash=prev,
    )


def signed(fed: LocalFederation, rec: AgreedRecord, signers: Sequence[str]) -> pb.AgreedRecord:
    payload = rec.payload()
    signatures = {p: load_signer(fed.members[p].key).sign(payload) for p in signers}
    return record_to_proto(rec, signatures)


def collect(
    fed: LocalFederation, held: Mapping[str, Sequence[pb.AgreedRecord] | Exception]
) -> tuple[list[RoundRow], dict[str, str]]:
    return asyncio.run(collect_rounds(client(fed, held), SESSION, PEERS))


def outcome(rows: list[RoundRow], planned: int) -> SessionOutcome:
    return SessionOutcome(SESSION, planned, {p: "finished" for p in PEERS}, rows, {})


def test_the_same_record_in_every_ledger(fed: LocalFederation) -> None:
    agreed = signed(fed, record(1, 7), PEERS)
    rows, unreachable = collect(fed, {p: [agreed] for p in PEERS})
    assert unreachable == {}
    [row] = rows
    assert row.held_by == PEERS
    assert row.differs == ()
    assert row.signatures == 3
    assert row.aggregator == "hospital-a"
    assert row.metrics == {"summed": 7}
    assert outcome(rows, 1).ok


def test_a_ledger_holding_another_record_is_named(fed: LocalFederation) -> None:
    agreed = signed(fed, record(1, 7), PEERS)
    other = signed(fed, record(1, 8), ["hospital-c"])  # hospital-c's ledger says otherwise
    rows, _ = collect(fed, {"hospital-a": [agreed], "hospital-b": [agreed], "hospital-c": [other]})
    [row] = rows
    assert row.held_by == ("hospital-a", "hospital-b")
    assert row.differs == ("hospital-c",)
    assert not outcome(rows, 1).ok


def test_signatures_that_do_not_verify_are_not_counted(fed: LocalFederation) -> None:
    rec = record(1, 7)
    honest = signed(fed, rec, ["hospital-a", "hospital-b"])
    # hospital-c's signature over another record, and one from a peer not in the roster.
    wrong = signed(fed, record(1, 9), ["hospital-c"]).signatures[0].signature
    forged = record_to_proto(
        rec,
        {
            **{s.peer_id: s.signature for s in honest.signatures},
            "hospital-c": wrong,
            "stranger": wrong,
        },
    )
    rows, _ = collect(fed, {p: [forged] for p in PEERS})
    assert rows[0].signatures == 2


def test_an_unreachable_peer_is_named_and_the_others_answer(fed: LocalFederation) -> None:
    first = record(1, 7)
    second = record(2, 9, prev=first.record_hash())
    records = [signed(fed, first, PEERS), signed(fed, second, PEERS)]
    down = PeerUnreachableError(
        "hospital-b at 127.0.0.1:1: connection refused", target="127.0.0.1:1", peer="hospital-b"
    )
    # hospital-c has not stored round 2 yet: the rows come from the ledger holding the most.
    rows, unreachable = collect(
        fed, {"hospital-a": records, "hospital-b": down, "hospital-c": records[:1]}
    )
    assert unreachable == {"hospital-b": "hospital-b at 127.0.0.1:1: connection refused"}
    assert [row.round for row in rows] == [1, 2]
    assert rows[0].held_by == ("hospital-a", "hospital-c")
    assert rows[1].held_by == ("hospital-a",)
    assert outcome(rows, 2).ok
    assert not outcome(rows[:1], 2).ok  # a planned round missing


def test_no_ledger_answers(fed: LocalFederation) -> None:
    down = PeerUnreachableError("down", target="127.0.0.1:1", peer=None)
    rows, unreachable = collect(fed, {p: down for p in PEERS})
    assert rows == []
    assert set(unreachable) == set(PEERS)
