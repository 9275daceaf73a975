"""Failover: a silent aggregator is abandoned within its stage's limit; a signed vote is kept
before it leaves, a retry's aggregator collects it, and no peer signs a second record.

The case (RELIABILITY.md, "agreed twice"): a round's aggregator collects every signed vote and
vanishes while it hands out the agreed record. Some peer may hold that record; the others
retry with the next aggregator. Before, they could only learn of the record by fetching it
from a peer that holds it, and agreed a second, different record when none was reachable.

These tests run the real participant (:func:`peer.round.participate`) and aggregator
(:class:`peer.round.AggregatorRound`) in one process, joined by an in-memory stream instead of
gRPC, with each peer's ledger in a file that is closed and opened again to restart the peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from peer.codec import record_to_proto
from peer.ledger import (
    AgreedRecord,
    Ledger,
    PrivacyKind,
    SignedVote,
    VoteConflictError,
    vote_statement_payload,
)
from peer.ledger_check import round_proof_problems, unrecheckable_rounds, vote_release_problems
from peer.payloads import LocalContribution, RoundResult
from peer.round import (
    AggregatorRound,
    RoundContext,
    RoundOutcome,
    RoundStatusKind,
    backend_for,
    participate,
    serve_round_stream,
)
from peer.round.aggregating import Encoded
from peer.round.agreement import prior_votes_agreed, tally, vote
from peer.round.participating import silence_limits
from peer.session import SessionProposal
from peer.training.accounting import pure_event
from peer.wire import peer_pb2 as pb
from secagg.crypto import SystemRandom, signer_from_private_key, verifier_from_public_key
from secagg.ring import WordArray

PEERS = ("hospital-a", "hospital-b", "hospital-c")
SESSION = "votes"
LENGTH = 8
STAGE = 1.0


class FreshPayload:
    """A payload with a fresh vector at every prepare (a restarted peer prepares anew)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def vector_length(self, round_: int) -> int:
        return LENGTH

    def prepare(self, round_: int) -> LocalContribution:
        vector = self._rng.integers(0, 1000, LENGTH, dtype=np.uint32)
        return LocalContribution(
            vector, epsilon=0.5, privacy_kind=PrivacyKind.STATISTICS, events=(pure_event(0.5),)
        )

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        return RoundResult(model=aggregate.astype("<u4").tobytes(), metrics={"n": len(survivors)})

    def epsilon_needed(self) -> float:
        return 0.5

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        return None


class VanishesWithTheRecord(AggregatorRound):
    """Collects every vote, then closes every stream without handing the record out (as an
    aggregator that crashes or is cut off right then)."""

    def _finish(self, final: object | None) -> None:
        super()._finish(None if isinstance(final, pb.AgreedRecord) else final)


class ShowsOnePeerTheTranscript(AggregatorRound):
    """Sends the transcript and the record draft to ``LUCKY`` only: the others never get to
    sign, so only one vote exists when the round aborts."""

    LUCKY = "hospital-b"

    def _send(self, peer: str, message: object) -> None:
        withheld = isinstance(message, pb.RecordDraft | Encoded)
        if peer == self.LUCKY or not withheld:
            super()._send(peer, message)


class _Call:
    """One participant's stream to an in-process aggregator (the gRPC call's interface)."""

    def __init__(
        self, agg: AggregatorRound, caller: str, on_write: Callable[[str, pb.Fragment], None]
    ):
        self._requests: asyncio.Queue[pb.Fragment | None] = asyncio.Queue()
        self._responses: asyncio.Queue[Any] = asyncio.Queue()
        self._on_write = on_write
        self._caller = caller
        self._task = asyncio.create_task(self._serve(agg, caller))

    async def _incoming(self) -> AsyncIterator[pb.Fragment]:
        while (fragment := await self._requests.get()) is not None:
            yield fragment

    async def _serve(self, agg: AggregatorRound, caller: str) -> None:
        async def find(hello: pb.RoundHello) -> AggregatorRound:
            return agg

        try:
            async for fragment in serve_round_stream(
                self._incoming(), caller, find, agg.ctx.max_message_bytes()
            ):
                await self._responses.put(fragment)
        finally:
            await self._responses.put(grpc.aio.EOF)  # type: ignore[attr-defined]

    async def write(self, fragment: pb.Fragment) -> None:
        self._on_write(self._caller, fragment)
        await self._requests.put(fragment)

    async def read(self) -> Any:
        return await self._responses.get()

    def cancel(self) -> bool:
        self._requests.put_nowait(None)
        return True


class _Stub:
    def __init__(
        self, agg: AggregatorRound, caller: str, on_write: Callable[[str, pb.Fragment], None]
    ):
        self._agg, self._caller, self._on_write = agg, caller, on_write

    def round_stream(self, timeout: float | None = None) -> _Call:
        return _Call(self._agg, self._caller, self._on_write)


class Consortium:
    """Three peers with file ledgers; :meth:`restart` reopens them with fresh payloads."""

    def __init__(self, tmp_path: Path, stage: float = STAGE) -> None:
        self.tmp_path = tmp_path
        self.stage = stage
        self.proposal = SessionProposal(
            SESSION,
            participants=PEERS,
            rounds=1,
            threshold=3,
            payload={"kind": "vector", "length": LENGTH},
            stage_seconds=stage,
            prepare_seconds=0.5,
        )
        keys = {p: ed25519.Ed25519PrivateKey.generate() for p in PEERS}
        self.signers = {p: signer_from_private_key(k) for p, k in keys.items()}
        self.verifiers = {p: verifier_from_public_key(k.public_key()) for p, k in keys.items()}
        self.ledgers: dict[str, Ledger] = {}
        self.payloads: dict[str, FreshPayload] = {}
        # For each vote fragment that left a peer: did its ledger hold the vote already?
        self.vote_kept_when_sent: dict[str, list[bool]] = {p: [] for p in PEERS}
        for i, peer in enumerate(PEERS):
            ledger = Ledger(self.url(peer))
            ledger.create()
            ledger.record_proposal(
                SESSION,
                self.proposal.document(),
                proposer="op",
                participants=PEERS,
                threshold=3,
                rounds_planned=1,
            )
            ledger.decide_session(SESSION, accept=True)
            self.ledgers[peer] = ledger
            self.payloads[peer] = FreshPayload(i)

    def url(self, peer: str) -> str:
        return f"sqlite:///{self.tmp_path / peer}.db"

    def restart(self) -> None:
        """Every peer stops (its ledger closed) and starts again from its ledger file."""
        for i, peer in enumerate(PEERS):
            self.ledgers[peer].close()
            self.ledgers[peer] = Ledger(self.url(peer))
            self.ledgers[peer].create()
            self.payloads[peer] = FreshPayload(100 + i)

    def ctx(self, me: str, attempt: int, aggregator: str) -> RoundContext:
        return RoundContext(
            me=me,
            session_id=SESSION,
            round=1,
            attempt=attempt,
            aggregator=aggregator,
            config=self.proposal.round_config(1, LENGTH, attempt=attempt),
            signer=self.signers[me],
            verifiers=self.verifiers,
            ledger=self.ledgers[me],
            payload=self.payloads[me],
            backend=backend_for("secagg"),
            rng=SystemRandom(),
            stage_seconds=self.stage,
            prepare_seconds=0.5,
        )

    def _on_write(self, peer: str, fragment: pb.Fragment) -> None:
        if fragment.kind == "AgreedRecord":
            kept = self.ledgers[peer].signed_vote(SESSION, 1)
            self.vote_kept_when_sent[peer].append(kept is not None)

    async def attempt(
        self, attempt: int, aggregator: str, cls: type[AggregatorRound] = AggregatorRound
    ) -> dict[str, RoundOutcome]:
        agg = cls(self.ctx(aggregator, attempt, aggregator))
        runner = asyncio.create_task(agg.run())
        outcomes = await asyncio.gather(
            *(
                participate(self.ctx(p, attempt, aggregator), _Stub(agg, p, self._on_write))
                for p in PEERS
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner, 10)
        return dict(zip(PEERS, outcomes, strict=True))


def test_a_kept_vote_survives_a_restart_and_the_next_aggregator_completes_its_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consortium = Consortium(tmp_path)
    caplog.set_level(logging.INFO, logger="peer.rounds")

    async def main() -> tuple[dict[str, RoundOutcome], dict[str, RoundOutcome]]:
        first = await consortium.attempt(0, "hospital-a", VanishesWithTheRecord)
        consortium.restart()  # between signing and collection: only the ledger survives
        second = await consortium.attempt(1, "hospital-b")
        return first, second

    first, second = asyncio.run(main())
    assert all(o.status is RoundStatusKind.AGGREGATOR_FAILED for o in first.values()), first
    kept = {p: consortium.ledgers[p].signed_vote(SESSION, 1) for p in PEERS}
    for peer in PEERS:
        # The vote was in the ledger before any byte of it left, and it outlived the peer.
        assert consortium.vote_kept_when_sent[peer] == [True], consortium.vote_kept_when_sent
        vote_ = kept[peer]
        assert vote_ is not None
        assert vote_.attempt == 0
        assert vote_.aggregator == "hospital-a"
        assert consortium.verifiers[peer].verify(vote_.signature, vote_.record.payload())
    assert len({v.record_hash for v in kept.values() if v is not None}) == 1

    # Attempt 1 (fresh inputs after the restart) agrees the record signed in attempt 0, with
    # the kept signatures, instead of a second record of the round.
    assert all(o.status is RoundStatusKind.AGREED for o in second.values()), second
    assert "agreed signatures=3 collected from an earlier attempt" in caplog.text
    for peer in PEERS:
        ledger = consortium.ledgers[peer]
        (stored,) = ledger.agreed_records(SESSION)
        vote_ = kept[peer]
        assert vote_ is not None
        assert stored.record_hash == vote_.record_hash
        assert stored.record.metrics["aggregator"] == "hospital-a"
        assert stored.signatures == {p: v.signature for p, v in kept.items() if v is not None}
        checkpoint = ledger.get_checkpoint(SESSION, 1)
        assert checkpoint is not None
        assert checkpoint.weights == vote_.model  # attempt 0's sum, not attempt 1's
        # No new vote was signed in attempt 1: the round closed at its first stage.
        assert consortium.vote_kept_when_sent[peer] == [True]
        # The evidence kept with the vote in attempt 0 is the round's evidence, and
        # verify-ledger re-checks it (before, such a round stored none).
        (proof,) = ledger.round_proofs()
        assert (proof.attempt, proof.aggregator) == (0, "hospital-a")
        assert round_proof_problems(ledger, consortium.verifiers) == []
        assert unrecheckable_rounds(ledger) == []


def test_a_vote_stuck_below_t_is_released_and_the_next_attempt_agrees(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The attack: attempt 0's aggregator shows only hospital-b the transcript, so b signs
    # record R alone and the round aborts with one vote. b never signs a second record
    # unless released, so before the release rule attempt 1 could not reach t = 3 (a and c
    # sign R', b votes R again) and the session aborted. Now a and c state, signed, that they
    # hold no vote: n - t + c + 1 = 2 such statements prove R can never reach t, b releases
    # its vote and signs R', and attempt 1 agrees.
    consortium = Consortium(tmp_path, stage=RELEASE_STAGE)
    caplog.set_level(logging.INFO, logger="peer.rounds")

    voters_after_first: list[str] = []
    first_votes: list[SignedVote] = []

    async def main() -> tuple[dict[str, RoundOutcome], dict[str, RoundOutcome]]:
        first = await consortium.attempt(0, "hospital-a", ShowsOnePeerTheTranscript)
        for p in PEERS:
            if (kept := consortium.ledgers[p].signed_vote(SESSION, 1)) is not None:
                voters_after_first.append(p)
                first_votes.append(kept)
        second = await consortium.attempt(1, "hospital-c")
        return first, second

    first, second = asyncio.run(main())
    assert all(o.status is not RoundStatusKind.AGREED for o in first.values()), first
    assert voters_after_first == ["hospital-b"]
    assert all(o.status is RoundStatusKind.AGREED for o in second.values()), second
    assert "peer=hospital-b session=votes round=1 attempt=1 released its vote" in caplog.text
    (released,) = consortium.ledgers["hospital-b"].released_votes(SESSION)
    assert (released.signed_attempt, released.released_attempt) == (0, 1)
    assert sorted(s.peer_id for s in released.evidence) == ["hospital-a", "hospital-c"]
    for statement in released.evidence:  # the evidence is kept, verifiable by anyone
        assert consortium.verifiers[statement.peer_id].verify(
            statement.signature, statement.payload()
        )
    heads = set()
    for peer in PEERS:
        (stored,) = consortium.ledgers[peer].agreed_records(SESSION)
        assert stored.record_hash != released.record_hash
        assert stored.record.metrics["attempt"] == 1
        heads.add(stored.record_hash)
    assert len(heads) == 1
    for peer in PEERS:
        (proof,) = consortium.ledgers[peer].round_proofs()
        assert proof.attempt == 1
        assert round_proof_problems(consortium.ledgers[peer], consortium.verifiers) == []
    # verify-ledger re-checks the release's evidence; an edited one is reported.
    b_ledger = consortium.ledgers["hospital-b"]
    assert vote_release_problems(b_ledger, consortium.verifiers) == []
    _edit_release_evidence(b_ledger, lambda items: items[:1])
    (problem,) = vote_release_problems(b_ledger, consortium.verifiers)
    assert "1 valid statements of peers that did not sign it, 2 needed" in problem.message
    _edit_release_evidence(b_ledger, lambda items: [*items, {**items[0], "peer": "hospital-c"}])
    forged, too_few = vote_release_problems(b_ledger, consortium.verifiers)
    assert forged.peers == ("hospital-c",)
    assert "vote statement of hospital-c is not signed by hospital-c" in forged.message
    assert "1 valid statements" in too_few.message
    # b never signs the released record again, in any attempt; nor do a and c, who stated.
    (r0,) = first_votes
    for peer in PEERS:
        for attempt in (0, 1, 2):
            with pytest.raises(VoteConflictError):
                consortium.ledgers[peer].record_vote(
                    r0.record, b"sig", attempt=attempt, aggregator="hospital-a", model=b""
                )


def _record(consortium: Consortium, round_: int, n: int) -> AgreedRecord:
    return AgreedRecord.build(
        SESSION,
        round_,
        aggregate_hash=bytes(32),
        model_hash=bytes(32),
        metrics={"n": n},
        epsilon={},
        prev_hash=consortium.ledgers["hospital-a"].session_head(SESSION),
    )


def test_announced_votes_count_only_for_this_round_and_their_own_signer(
    tmp_path: Path,
) -> None:
    consortium = Consortium(tmp_path)
    ctx = consortium.ctx("hospital-a", 1, "hospital-a")
    warnings: list[str] = []

    def warn(message: str, *args: object) -> None:
        warnings.append(message % args)

    def votes_for(
        record: AgreedRecord, signer_of: Callable[[str], str]
    ) -> dict[str, pb.AgreedRecord]:
        return {
            p: record_to_proto(record, {p: consortium.signers[signer_of(p)].sign(record.payload())})
            for p in PEERS
        }

    # Honest: three votes for this round's record complete it.
    honest = _record(consortium, 1, 3)
    agreed = prior_votes_agreed(votes_for(honest, lambda p: p), ctx, warn)
    assert agreed is not None
    assert sorted(s.peer_id for s in agreed.signatures) == sorted(PEERS)
    # Replayed: votes signed for another round (same chain head) complete nothing.
    warnings.clear()
    assert prior_votes_agreed(votes_for(_record(consortium, 2, 3), lambda p: p), ctx, warn) is None
    assert warnings == [f"participant={p} announced a vote of another round" for p in PEERS]
    # Forged: hospital-c announces a vote that hospital-b signed; it does not count.
    warnings.clear()
    forged = votes_for(honest, lambda p: "hospital-b" if p == "hospital-c" else p)
    assert prior_votes_agreed(forged, ctx, warn) is None
    assert "participant=hospital-c sent a record without its own valid signature" in warnings


def test_vote_sends_the_kept_vote_and_never_signs_a_conflicting_record(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path)
    ctx = consortium.ctx("hospital-a", 0, "hospital-b")
    first, second = _record(consortium, 1, 3), _record(consortium, 1, 2)
    mine, ballot = vote(ctx, (first, b"model-1", first.record_hash(), PEERS))
    assert mine[0] == first
    ctx = consortium.ctx("hospital-a", 1, "hospital-c")
    mine, ballot = vote(ctx, (second, b"model-2", second.record_hash(), PEERS[:2]))
    # What goes out is the first record with the signature kept for it.
    assert mine[0] == first
    assert mine[1] == b"model-1"
    assert ballot.metrics_hash == first.metrics_hash
    (signature,) = ballot.signatures
    assert signature.record_hash == first.record_hash()
    assert consortium.verifiers["hospital-a"].verify(signature.signature, first.payload())
    with pytest.raises(VoteConflictError, match="already signed record"):
        consortium.ledgers["hospital-a"].record_vote(
            second, b"sig", attempt=1, aggregator="hospital-c", model=b"model-2"
        )


def test_an_agreed_record_this_peer_never_signed_is_a_claim_not_stored(tmp_path: Path) -> None:
    # An aggregator that answers the hellos with an "agreed" record nobody signed: a peer
    # without a kept vote for it stores nothing and treats it as a claim to verify.
    consortium = Consortium(tmp_path)
    bogus = _record(consortium, 1, 3)

    class ClaimsAgreement(AggregatorRound):
        async def _run(self) -> None:
            await self._wait(lambda: len(self._outboxes) == len(PEERS), 5)
            self._finish(record_to_proto(bogus, {"hospital-c": b"not a signature"}))

    outcomes = asyncio.run(consortium.attempt(0, "hospital-c", ClaimsAgreement))
    for peer, outcome in outcomes.items():
        assert outcome.status is RoundStatusKind.AGGREGATOR_FAILED, (peer, outcome)
        assert outcome.precondition == pb.PRECONDITION_ROUND_AGREED
        assert consortium.ledgers[peer].agreed_records(SESSION) == []


class SilentFromTheMaskedStage(AggregatorRound):
    """Stops sending once the masked inputs are asked for (as if cut off): no RST, no EOF."""

    def _send(self, peer: str, message: object) -> None:
        if self.protocol.stage.value in ("masked", "consistency", "unmask") or isinstance(
            message, pb.RecordDraft | Encoded | pb.AgreedRecord | pb.Abort
        ):
            self.went_silent = getattr(self, "went_silent", time.monotonic())
            return
        super()._send(peer, message)

    def _finish(self, final: object | None) -> None:
        self.finished.set()  # never closes the streams either


@pytest.mark.timeout(60)  # without the limits the in-memory stream waits for ever
def test_a_silent_aggregator_is_abandoned_within_its_stage_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    consortium = Consortium(tmp_path)
    caplog.set_level(logging.INFO, logger="peer.rounds")
    started = time.monotonic()
    outcomes = asyncio.run(consortium.attempt(0, "hospital-a", SilentFromTheMaskedStage))
    elapsed = time.monotonic() - started
    limit = silence_limits(STAGE, 0.5)["stage"]
    for peer, outcome in outcomes.items():
        assert outcome.status is RoundStatusKind.AGGREGATOR_FAILED, (peer, outcome)
        assert outcome.reason == f"aggregator hospital-a silent for {limit:.1f}s in stage share"
        assert not outcome.unreachable
    assert "aggregator hospital-a silent for 2.0s in stage share" in caplog.text
    # Keys (join), shares, then silence: well under the stream's overall deadline (11 s).
    assert elapsed < silence_limits(STAGE, 0.5)["join"] + limit + 3, elapsed


# ------------------------------------------------------------------ releasing a stuck vote
# Attacks on the release rule (SECURITY.md, "Releasing a stuck vote"): attempt 0 leaves
# hospital-b alone with a vote for record R; attempt 1's aggregator (hospital-c) tampers with
# the vote statements it relays, or a colluder lies in its own statement.


def _statement(
    consortium: Consortium,
    signer: str,
    *,
    peer: str | None = None,
    session: str = SESSION,
    round_: int = 1,
    attempt: int = 1,
) -> pb.VoteStatement:
    """A vote statement "I hold no vote", signed with ``signer``'s key, claiming ``peer``."""
    claimed = peer or signer
    payload = vote_statement_payload(session, round_, attempt, claimed, b"")
    return pb.VoteStatement(
        session_id=session,
        round=round_,
        attempt=attempt,
        peer_id=claimed,
        vote_hash=b"",
        signature=consortium.signers[signer].sign(payload),
    )


# Attempt 0 must leave b holding its vote: b verifies the transcript and signs within the
# aggregator's vote wait (2 stages), which a loaded machine can miss at 1 s.
RELEASE_STAGE = 2.0


async def _only_b_signs(consortium: Consortium) -> None:
    await consortium.attempt(0, "hospital-a", ShowsOnePeerTheTranscript)
    kept = {p: consortium.ledgers[p].signed_vote(SESSION, 1) for p in PEERS}
    assert [p for p, v in kept.items() if v is not None] == ["hospital-b"], kept


class RelaysOtherStatements(AggregatorRound):
    """Replaces the vote statements of the record draft with ``STATEMENTS``."""

    STATEMENTS: ClassVar[list[pb.VoteStatement]] = []

    def _send(self, peer: str, message: object) -> None:
        if isinstance(message, pb.RecordDraft):
            tampered = pb.RecordDraft()
            tampered.CopyFrom(message)
            del tampered.vote_statements[:]
            tampered.vote_statements.extend(self.STATEMENTS)
            message = tampered
        super()._send(peer, message)


FORGERIES: dict[str, Callable[[Consortium], list[pb.VoteStatement]]] = {
    # Genuine statements of attempt 0, replayed in attempt 1.
    "replayed from attempt 0": lambda c: [
        _statement(c, "hospital-a", attempt=0),
        _statement(c, "hospital-c", attempt=0),
    ],
    "of another session": lambda c: [
        _statement(c, "hospital-a"),
        _statement(c, "hospital-c", session="other"),
    ],
    "of another round": lambda c: [
        _statement(c, "hospital-a"),
        _statement(c, "hospital-c", round_=2),
    ],
    # hospital-a signs a statement in hospital-c's name.
    "signed by another peer": lambda c: [
        _statement(c, "hospital-a"),
        _statement(c, "hospital-a", peer="hospital-c"),
    ],
    "of a peer outside the roster": lambda c: [
        _statement(c, "hospital-a"),
        _statement(c, "hospital-a", peer="hospital-z"),
    ],
    "twice by one peer": lambda c: [_statement(c, "hospital-a"), _statement(c, "hospital-a")],
}
EXPECTED = {
    "replayed from attempt 0": "invalid vote statement of hospital-a is for session 'votes' "
    "round 1 attempt 0, not session 'votes' round 1 attempt 1",
    "of another session": "invalid vote statement of hospital-c is for session 'other'",
    "of another round": "invalid vote statement of hospital-c is for session 'votes' round 2",
    "signed by another peer": "invalid vote statement of hospital-c is not signed by hospital-c",
    "of a peer outside the roster": "invalid vote statement of 'hospital-z', who is not in the "
    "roster",
    "twice by one peer": "relayed two vote statements of hospital-a",
}


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_forged_or_replayed_vote_statements_release_nothing_and_name_the_aggregator(
    tmp_path: Path, forgery: str
) -> None:
    consortium = Consortium(tmp_path, stage=RELEASE_STAGE)
    RelaysOtherStatements.STATEMENTS = FORGERIES[forgery](consortium)

    async def main() -> dict[str, RoundOutcome]:
        await _only_b_signs(consortium)
        return await consortium.attempt(1, "hospital-c", RelaysOtherStatements)

    outcomes = asyncio.run(main())
    b = outcomes["hospital-b"]
    assert b.status is RoundStatusKind.REFUSED, b
    assert b.reason.startswith("hospital-c: relayed "), b.reason
    assert EXPECTED[forgery] in b.reason, b.reason
    b_ledger = consortium.ledgers["hospital-b"]
    assert b_ledger.released_votes(SESSION) == []
    kept = b_ledger.signed_vote(SESSION, 1)
    assert kept is not None
    assert kept.attempt == 0
    for ledger in consortium.ledgers.values():
        assert ledger.agreed_records(SESSION) == []


def test_too_few_vote_statements_keep_the_vote(tmp_path: Path) -> None:
    # One genuine statement where n - t + c + 1 = 2 are needed: R could still reach t (with a
    # colluder), so b votes R again and the round is not agreed (retried later).
    consortium = Consortium(tmp_path, stage=RELEASE_STAGE)
    RelaysOtherStatements.STATEMENTS = [_statement(consortium, "hospital-a")]

    async def main() -> dict[str, RoundOutcome]:
        await _only_b_signs(consortium)
        return await consortium.attempt(1, "hospital-c", RelaysOtherStatements)

    outcomes = asyncio.run(main())
    assert all(o.status is RoundStatusKind.ABORTED for o in outcomes.values()), outcomes
    assert "only 2 peers signed the same record, 3 needed" in outcomes["hospital-a"].reason
    kept = consortium.ledgers["hospital-b"].signed_vote(SESSION, 1)
    assert kept is not None
    assert kept.attempt == 0
    assert consortium.ledgers["hospital-b"].released_votes(SESSION) == []


class ShowsTwoPeersTheTranscript(ShowsOnePeerTheTranscript):
    """Only the colluder hospital-a (this aggregator's own peer) and hospital-b sign."""

    def _send(self, peer: str, message: object) -> None:
        if peer == "hospital-a" or not isinstance(message, pb.RecordDraft | Encoded):
            AggregatorRound._send(self, peer, message)
        else:
            super()._send(peer, message)


def test_a_lying_colluder_cannot_get_two_records_of_a_round_agreed(tmp_path: Path) -> None:
    # hospital-a (c = 1 colluder, aggregator of attempt 0) and honest hospital-b sign R. Then
    # a erases its vote and states, in attempt 1, that it holds none: with c's honest
    # statement that releases b, and attempt 1 agrees R'. The colluders still hold a's and
    # b's signatures over R, but the third one can never be had: hospital-c stated its vote
    # as attempt 1 started and signs no record of attempt 0. R stays at 2 < t.
    consortium = Consortium(tmp_path, stage=RELEASE_STAGE)
    r_votes: dict[str, SignedVote] = {}

    async def main() -> dict[str, RoundOutcome]:
        await consortium.attempt(0, "hospital-a", ShowsTwoPeersTheTranscript)
        for p in ("hospital-a", "hospital-b"):
            kept = consortium.ledgers[p].signed_vote(SESSION, 1)
            assert kept is not None
            r_votes[p] = kept
        assert consortium.ledgers["hospital-c"].signed_vote(SESSION, 1) is None
        _erase_vote(consortium.ledgers["hospital-a"])  # the colluder's lie
        return await consortium.attempt(1, "hospital-c")

    outcomes = asyncio.run(main())
    assert all(o.status is RoundStatusKind.AGREED for o in outcomes.values()), outcomes
    (agreed,) = {h for h in (_head(consortium, p) for p in PEERS)}
    r = r_votes["hospital-b"].record
    assert agreed != r.record_hash()
    # The colluders try to complete R: c refuses to sign it in any attempt...
    for attempt in (0, 1, 2):
        with pytest.raises(VoteConflictError):
            consortium.ledgers["hospital-c"].record_vote(
                r, b"sig", attempt=attempt, aggregator="hospital-a", model=b""
            )
    # ...so the signatures of R that exist (a's and b's) are two, short of t = 3.
    votes = {p: record_to_proto(r, {p: v.signature}) for p, v in r_votes.items()}
    ctx = consortium.ctx("hospital-a", 2, "hospital-a")
    agreed_r, why = tally(votes, consortium.verifiers, ctx.config.threshold, lambda *a: None)
    assert agreed_r is None
    assert why == "only 2 peers signed the same record, 3 needed"


def _erase_vote(ledger: Ledger) -> None:
    from peer.ledger._schema import SignedVoteRow

    with ledger.transaction(write=True) as session:
        row = session.get(SignedVoteRow, (SESSION, 1))
        assert row is not None
        session.delete(row)


def _head(consortium: Consortium, peer: str) -> bytes:
    (stored,) = consortium.ledgers[peer].agreed_records(SESSION)
    return stored.record_hash


def test_an_attempt_already_over_for_a_peer_is_refused_before_any_work(tmp_path: Path) -> None:
    # hospital-a stated its vote as attempt 2 started (then restarted, say, and its runner
    # came back at attempt 1): it must sign no record of attempt 1, so it takes no part,
    # and says so before preparing or charging anything.
    consortium = Consortium(tmp_path)
    consortium.ledgers["hospital-a"].state_vote(SESSION, 1, 2)

    class NeverPrepares(FreshPayload):
        def prepare(self, round_: int) -> LocalContribution:
            raise AssertionError("prepared a contribution for an attempt that is over")

    class NoStream:
        def round_stream(self, timeout: float | None = None) -> Any:
            raise AssertionError("dialled the aggregator of an attempt that is over")

    consortium.payloads["hospital-a"] = NeverPrepares(0)
    ctx = consortium.ctx("hospital-a", 1, "hospital-b")
    outcome = asyncio.run(participate(ctx, NoStream()))
    assert outcome.status is RoundStatusKind.REFUSED
    assert "cannot state its vote" in outcome.reason
    assert "attempt 1 is over for it" in outcome.reason


def _edit_release_evidence(ledger: Ledger, edit: Callable[[list[Any]], list[Any]]) -> None:
    """Tamper with the stored evidence of the ledger's one released vote."""
    from peer.ledger._schema import VoteReleaseRow

    with ledger.transaction(write=True) as session:
        (row,) = session.query(VoteReleaseRow).all()
        row.evidence = json.dumps(edit(json.loads(row.evidence)))


def test_a_stream_that_cannot_be_opened_fails_this_round_not_the_peer(tmp_path: Path) -> None:
    # A renewal closes the pooled channels (peer/node.py) while a participant trains; a call
    # on a closed channel raises grpc's UsageError, not an RpcError. It once escaped
    # participate() and stopped the peer's whole session (CI, test_renewal_network.py).
    consortium = Consortium(tmp_path)

    class ClosedChannel:
        def round_stream(self, timeout: float | None = None) -> Any:
            raise grpc.aio.UsageError("Channel is closed.")

    ctx = consortium.ctx("hospital-a", 0, "hospital-b")
    outcome = asyncio.run(participate(ctx, ClosedChannel()))
    assert outcome.status is RoundStatusKind.AGGREGATOR_FAILED
    assert "cannot open a round stream to aggregator hospital-b" in outcome.reason
    assert "Channel is closed" in outcome.reason
