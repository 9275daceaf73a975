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
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from peer.codec import record_to_proto
from peer.ledger import AgreedRecord, Ledger, PrivacyKind, VoteConflictError
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
from peer.round.agreement import prior_votes_agreed, vote
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

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.proposal = SessionProposal(
            SESSION,
            participants=PEERS,
            rounds=1,
            threshold=3,
            payload={"kind": "vector", "length": LENGTH},
            stage_seconds=STAGE,
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
            stage_seconds=STAGE,
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


def test_a_peer_never_signs_a_second_record_for_a_round(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Attempt 0's aggregator shows only hospital-b the transcript: b signs, the round aborts
    # with one vote. In attempt 1 a and c sign a new record, b votes for its old one again:
    # neither record reaches t = 3, and nothing is agreed. That is the price of the rule (a
    # lost round, retried), never two agreed records of one round.
    consortium = Consortium(tmp_path)
    caplog.set_level(logging.INFO, logger="peer.rounds")

    voters_after_first: list[str] = []

    async def main() -> tuple[dict[str, RoundOutcome], dict[str, RoundOutcome]]:
        first = await consortium.attempt(0, "hospital-a", ShowsOnePeerTheTranscript)
        voters_after_first.extend(
            p for p in PEERS if consortium.ledgers[p].signed_vote(SESSION, 1) is not None
        )
        second = await consortium.attempt(1, "hospital-c")
        return first, second

    first, second = asyncio.run(main())
    assert all(o.status is not RoundStatusKind.AGREED for o in first.values()), first
    b_vote = consortium.ledgers["hospital-b"].signed_vote(SESSION, 1)
    assert b_vote is not None
    assert b_vote.attempt == 0
    assert voters_after_first == ["hospital-b"]

    assert all(o.status is RoundStatusKind.ABORTED for o in second.values()), second
    assert "only 2 peers signed the same record, 3 needed" in second["hospital-a"].reason
    assert "peer=hospital-b session=votes round=1 attempt=1 already signed record" in caplog.text
    # b still stands for its first record only; a and c for the new one.
    again = consortium.ledgers["hospital-b"].signed_vote(SESSION, 1)
    assert again is not None
    assert again.record_hash == b_vote.record_hash
    for peer in ("hospital-a", "hospital-c"):
        fresh = consortium.ledgers[peer].signed_vote(SESSION, 1)
        assert fresh is not None
        assert fresh.attempt == 1
        assert fresh.record_hash != b_vote.record_hash
    for ledger in consortium.ledgers.values():
        assert ledger.agreed_records(SESSION) == []


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
