"""Every release is charged before it leaves; nothing is released uncharged.

The attack (issue 9, item 5): every attempt of a round releases a noisy contribution to that
attempt's aggregator, who can unmask it and then abort so that no record is agreed. If the
charge were written only with the agreed record, three such aborts and one agreed attempt
would be four releases and one charge.

These tests run the real participant code (:func:`peer.round.participate`) and the real
aggregator (:class:`peer.round.AggregatorRound`) in one process, joined by an in-memory
stream instead of gRPC, with an aggregator that completes the unmasking (it holds the
aggregate, and every participant verified it) and then aborts. The ledger is checked after
every attempt, and at the moment each participant's first byte leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from peer.attempts import INTERNAL_ERROR, own_failure, rejoin_attempt
from peer.ledger import Ledger, PrivacyCharge, PrivacyKind
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
from peer.session import SessionProposal
from peer.training.accounting import composed_epsilon, pure_event
from peer.wire import peer_pb2 as pb
from secagg import Stage
from secagg.crypto import SystemRandom, signer_from_private_key, verifier_from_public_key
from secagg.ring import WordArray

PEERS = ("hospital-a", "hospital-b", "hospital-c")
SESSION = "charges"
LENGTH = 8
EPSILON = 0.5


class NoisyPayload:
    """A payload releasing a noisy vector: fresh noise per prepare, or one per round."""

    def __init__(self, seed: int, *, reuse: bool) -> None:
        self._rng = np.random.default_rng(seed)
        self._reuse = reuse
        self._prepared: dict[int, LocalContribution] = {}

    def vector_length(self, round_: int) -> int:
        return LENGTH

    def prepare(self, round_: int) -> LocalContribution:
        if self._reuse and round_ in self._prepared:
            return self._prepared[round_]
        vector = self._rng.integers(0, 1000, LENGTH, dtype=np.uint32)
        contribution = LocalContribution(
            vector,
            epsilon=EPSILON,
            privacy_kind=PrivacyKind.STATISTICS,
            events=(pure_event(EPSILON),),
        )
        self._prepared[round_] = contribution
        return contribution

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        return RoundResult(model=aggregate.astype("<u4").tobytes(), metrics={"n": len(survivors)})

    def epsilon_needed(self) -> float:
        return EPSILON

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        return None


class AbortAfterUnmasking(AggregatorRound):
    """A malicious aggregator: it unmasks (it holds the aggregate), then aborts instead of
    sending the signed statement of the linear check (or anything later). (Aborting after
    the votes no longer fails the round: each participant keeps its signed vote and the next
    aggregator completes that record, tests/round/test_round_failover.py.)"""

    def _send(self, peer: str, message: object) -> None:
        # The statement (stage PROVE) or the transcript: the aggregate is unmasked by now.
        if isinstance(message, Encoded) and (
            self.protocol.stage is Stage.PROVE or self.protocol.result is not None
        ):
            self.result = "aborted after unmasking"
            self._finish(pb.Abort(reason=self.result, offender=""))
            return
        super()._send(peer, message)


class _Call:
    """One participant's stream to an in-process aggregator (the gRPC call's interface)."""

    def __init__(self, agg: AggregatorRound, caller: str, on_write: Callable[[str], None]) -> None:
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
        self._on_write(self._caller)
        await self._requests.put(fragment)

    async def read(self) -> Any:
        return await self._responses.get()

    def cancel(self) -> bool:
        self._requests.put_nowait(None)
        return True


class _Stub:
    """The aggregator's stub, as :func:`participate` dials it."""

    def __init__(self, agg: AggregatorRound, caller: str, on_write: Callable[[str], None]):
        self._agg, self._caller, self._on_write = agg, caller, on_write

    def round_stream(self, timeout: float | None = None) -> _Call:
        return _Call(self._agg, self._caller, self._on_write)


class Consortium:
    def __init__(self, tmp_path: Path, *, reuse: bool) -> None:
        self.proposal = SessionProposal(
            SESSION,
            participants=PEERS,
            rounds=1,
            threshold=3,  # every one of the 3: the safe threshold (SECURITY.md)
            payload={"kind": "vector", "length": LENGTH},
            stage_seconds=5.0,
            prepare_seconds=1.0,
        )
        keys = {p: ed25519.Ed25519PrivateKey.generate() for p in PEERS}
        self.signers = {p: signer_from_private_key(k) for p, k in keys.items()}
        self.verifiers = {p: verifier_from_public_key(k.public_key()) for p, k in keys.items()}
        self.ledgers: dict[str, Ledger] = {}
        self.payloads = {p: NoisyPayload(i, reuse=reuse) for i, p in enumerate(PEERS)}
        for peer in PEERS:
            ledger = Ledger(f"sqlite:///{tmp_path / peer}.db")
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
        # Charges each peer had in its ledger when its first byte of an attempt left.
        self.charged_at_first_write: dict[str, list[int]] = {p: [] for p in PEERS}
        self._written: set[str] = set()

    def ctx(self, me: str, attempt: int, aggregator: str) -> RoundContext:
        return RoundContext(
            me=me,
            session_id=SESSION,
            round=1,
            attempt=attempt,
            aggregator=aggregator,
            config=self.proposal.round_config(1, LENGTH),
            signer=self.signers[me],
            verifiers=self.verifiers,
            ledger=self.ledgers[me],
            payload=self.payloads[me],
            backend=backend_for("secagg"),
            rng=SystemRandom(),
            stage_seconds=5.0,
            prepare_seconds=1.0,
        )

    def _first_write(self, peer: str) -> None:
        if peer not in self._written:
            self._written.add(peer)
            charges = self.ledgers[peer].privacy_charges(peer, SESSION)
            self.charged_at_first_write[peer].append(len(charges))

    async def attempt(self, attempt: int, *, malicious: bool) -> list[RoundOutcome]:
        self._written.clear()
        aggregator = PEERS[attempt % len(PEERS)]
        cls = AbortAfterUnmasking if malicious else AggregatorRound
        agg = cls(self.ctx(aggregator, attempt, aggregator))
        runner = asyncio.create_task(agg.run())
        outcomes = await asyncio.gather(
            *(
                participate(
                    self.ctx(p, attempt, aggregator),
                    _Stub(agg, p, self._first_write),
                )
                for p in PEERS
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner, 10)
        return list(outcomes)


def _run(consortium: Consortium) -> list[list[RoundOutcome]]:
    async def main() -> list[list[RoundOutcome]]:
        results = [await consortium.attempt(a, malicious=True) for a in (1, 2, 3)]
        results.append(await consortium.attempt(4, malicious=False))
        return results

    return asyncio.run(main())


def test_fresh_noise_per_attempt_is_charged_per_attempt(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, reuse=False)
    results = _run(consortium)
    for outcomes in results[:3]:
        assert all(o.status is RoundStatusKind.ABORTED for o in outcomes), outcomes
        assert all("aborted after unmasking" in o.reason for o in outcomes)
    assert all(o.status is RoundStatusKind.AGREED for o in results[3]), results[3]
    for peer in PEERS:
        ledger = consortium.ledgers[peer]
        charges = ledger.privacy_charges(peer, SESSION)
        # Four noisy releases (3 aborted + 1 agreed), four charges, each from its attempt.
        assert sorted(c.attempt for c in charges) == [1, 2, 3, 4]
        assert len({c.release_id for c in charges}) == 4
        # Each charge was in the ledger before the attempt's first byte left the peer.
        assert consortium.charged_at_first_write[peer] == [1, 2, 3, 4]
        spent = ledger.privacy_spent(peer)
        assert spent.statistics_epsilon == pytest.approx(4 * EPSILON)
        assert spent.epsilon == pytest.approx(composed_epsilon([pure_event(EPSILON)] * 4))
        assert spent.epsilon > 3 * EPSILON  # four pure releases compose to about 4 epsilon
        # The agreed record states this attempt's spending; the total is still four.
        (stored,) = ledger.agreed_records(SESSION)
        assert stored.record.epsilon[peer] == EPSILON


def test_a_retry_that_resends_the_same_value_is_not_charged_twice(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, reuse=True)
    results = _run(consortium)
    assert all(o.status is RoundStatusKind.AGREED for o in results[3])
    for peer in PEERS:
        charges = consortium.ledgers[peer].privacy_charges(peer, SESSION)
        # The same value went to four aggregators: one release of information, one charge,
        # made before the first attempt sent anything.
        assert [c.attempt for c in charges] == [1]
        assert consortium.charged_at_first_write[peer] == [1, 1, 1, 1]
        assert consortium.ledgers[peer].privacy_spent(peer).statistics_epsilon == EPSILON


def test_nothing_leaves_when_the_charge_cannot_be_written(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, reuse=False)
    # hospital-a's ledger does not know the session: the charge is refused.
    broken = Ledger(f"sqlite:///{tmp_path / 'empty'}.db")
    broken.create()
    consortium.ledgers["hospital-a"] = broken

    async def main() -> RoundOutcome:
        agg = AggregatorRound(consortium.ctx("hospital-b", 1, "hospital-b"))
        return await participate(
            consortium.ctx("hospital-a", 1, "hospital-b"),
            _Stub(agg, "hospital-a", consortium._first_write),
        )

    outcome = asyncio.run(main())
    assert outcome.status is RoundStatusKind.REFUSED
    assert "cannot charge privacy" in outcome.reason
    assert consortium.charged_at_first_write["hospital-a"] == [], "bytes left uncharged"


def test_ledger_charges_each_release_once_and_keeps_aborted_ones(tmp_path: Path) -> None:
    consortium = Consortium(tmp_path, reuse=False)
    ledger = consortium.ledgers["hospital-a"]
    charge = PrivacyCharge("hospital-a", PrivacyKind.STATISTICS, 0.5, 0.0, pure_event(0.5))
    assert ledger.charge_release(SESSION, 1, 1, "value-1", charge)
    assert not ledger.charge_release(SESSION, 1, 2, "value-1", charge)  # the same value
    assert ledger.charge_release(SESSION, 1, 3, "value-2", charge)  # fresh noise
    attempt = ledger.start_round(SESSION, 1, aggregator="b", participants=list(PEERS))
    ledger.abort_round(SESSION, 1, attempt.attempt, reason="aggregator aborted")
    assert [c.attempt for c in ledger.privacy_charges("hospital-a")] == [1, 3]


def test_old_charges_without_events_count_by_basic_composition(tmp_path: Path) -> None:
    """A ledger written before events existed: its charges add up, the new ones compose."""
    from peer.ledger import AgreedRecord

    consortium = Consortium(tmp_path, reuse=False)
    ledger = consortium.ledgers["hospital-a"]
    record = AgreedRecord.build(
        SESSION,
        1,
        aggregate_hash=bytes(32),
        model_hash=bytes(32),
        metrics={},
        epsilon={"hospital-a": 0.7},
        prev_hash=ledger.session_head(SESSION),
    )
    old = PrivacyCharge("hospital-a", PrivacyKind.TRAINING, 0.7, 1e-5)
    ledger.append_agreed(record, {}, privacy=[old], min_signatures=0)
    assert ledger.privacy_spent("hospital-a").epsilon == pytest.approx(0.7)
    new = PrivacyCharge("hospital-a", PrivacyKind.STATISTICS, 0.5, 0.0, pure_event(0.5))
    ledger.charge_release(SESSION, 2, 1, "value", new)
    expected = 0.7 + composed_epsilon([pure_event(0.5)])
    assert ledger.privacy_spent("hospital-a").epsilon == pytest.approx(expected)


# ---------------------------------------------------------------- the same attempt run twice
# (review of the runner's rejoin rule, peer/attempts.py rejoin_attempt: after a failure of
# its own a peer runs the same attempt again, once)


class _Recording(AbortAfterUnmasking):
    """The malicious aggregator above, which also keeps what each participant sent."""

    seen: dict[str, list[object]]

    def deliver(self, peer: str, message: object) -> None:
        self.seen.setdefault(peer, []).append(message)
        super().deliver(peer, message)


@pytest.mark.parametrize("reuse", [True, False], ids=["same-value", "fresh-noise"])
def test_the_same_attempt_run_twice_uses_fresh_masks_and_charges_each_value(
    tmp_path: Path, reuse: bool
) -> None:
    # The attack: a malicious aggregator gets every peer to run attempt 1 twice (as the
    # rejoin rule does after a failure of the peer's own) and unmasks both runs. Were the
    # masks a function of (session, round, attempt), two masked inputs of one peer would
    # give x1 - x2. They are not: every run draws new X25519 keys and a new self-mask seed.
    from secagg import AdvertiseKeys, MaskedInput

    consortium = Consortium(tmp_path, reuse=reuse)
    aggregator = PEERS[1]

    async def run_attempt_1() -> dict[str, list[object]]:
        agg = _Recording(consortium.ctx(aggregator, 1, aggregator))
        agg.seen = {}
        runner = asyncio.create_task(agg.run())
        outcomes = await asyncio.gather(
            *(
                participate(consortium.ctx(p, 1, aggregator), _Stub(agg, p, lambda _: None))
                for p in PEERS
            )
        )
        await asyncio.wait_for(runner, 10)
        assert all("aborted after unmasking" in o.reason for o in outcomes), outcomes
        return agg.seen

    first, second = asyncio.run(run_attempt_1()), asyncio.run(run_attempt_1())
    for peer in PEERS:
        keys = [
            next(m for m in run[peer] if isinstance(m, AdvertiseKeys)) for run in (first, second)
        ]
        assert keys[0].mask_public != keys[1].mask_public
        assert keys[0].channel_public != keys[1].channel_public
        assert keys[0].self_mask_commitment != keys[1].self_mask_commitment
        inputs = [
            next(m for m in run[peer] if isinstance(m, MaskedInput)) for run in (first, second)
        ]
        assert not np.array_equal(inputs[0].vector, inputs[1].vector)
        # One charge per distinct released value: the same value sent twice is one release.
        charges = consortium.ledgers[peer].privacy_charges(peer, SESSION)
        assert [c.attempt for c in charges] == ([1] if reuse else [1, 1])
        # Neither run signed a record (the aggregator aborted before the draft).
        assert consortium.ledgers[peer].signed_vote(SESSION, 1) is None
        assert consortium.ledgers[peer].stated_attempt(SESSION, 1) == 1


def test_an_honest_aggregator_takes_one_stream_per_peer_in_a_round(tmp_path: Path) -> None:
    # A peer that rejoins the attempt it failed cannot put a second run into the round it
    # joined: the aggregator refuses the second hello (the rejoin helps only a peer that
    # failed before its hello, or the aggregator's own peer, which starts a new round).
    consortium = Consortium(tmp_path, reuse=True)

    async def main() -> None:
        agg = AggregatorRound(consortium.ctx(PEERS[1], 1, PEERS[1]))
        hello = pb.RoundHello(session_id=SESSION, round=1, attempt=1, peer_id=PEERS[0])
        agg.join(hello)
        agg.leave(PEERS[0])  # its first run ended (the peer's own failure)
        with pytest.raises(PermissionError, match="already has a stream open"):
            agg.join(hello)

    asyncio.run(main())


class _AbortsSayingInternalError(AggregatorRound):
    """A malicious aggregator whose Abort reason reads like the participant's own failure."""

    async def run(self) -> None:
        await asyncio.sleep(0.2)  # the participants have joined
        self.result = f"{INTERNAL_ERROR}: KeyError: 'spoofed by the aggregator'"
        self._finish(pb.Abort(reason=self.result, offender=""))


def test_an_aggregators_abort_text_is_not_taken_for_the_peers_own_failure(
    tmp_path: Path,
) -> None:
    # The attack: the runner joins the same attempt again after a failure of the peer's own,
    # and counts the same unexpected error in a row towards aborting the session. Were an
    # outcome's text alone the test, an aggregator's Abort reason "internal error: ..."
    # would buy it a second run of its attempt and count as the peer's own bug (two
    # colluding aggregators in a row, not three, could then end the session at a peer).
    consortium = Consortium(tmp_path, reuse=True)
    aggregator = PEERS[1]

    async def main() -> RoundOutcome:
        agg = _AbortsSayingInternalError(consortium.ctx(aggregator, 1, aggregator))
        runner = asyncio.create_task(agg.run())
        outcome = await participate(
            consortium.ctx(PEERS[0], 1, aggregator), _Stub(agg, PEERS[0], lambda _: None)
        )
        await runner
        return outcome

    outcome = asyncio.run(main())
    assert outcome.status is RoundStatusKind.ABORTED, outcome
    assert outcome.reason.startswith(INTERNAL_ERROR)  # the aggregator's words
    assert not own_failure(outcome)
    assert not own_failure(outcome, (INTERNAL_ERROR,))
    assert not rejoin_attempt(1, 1, outcome, [], set())
    # This peer's own failure (a contribution it could not prepare) still counts.
    mine = RoundOutcome(RoundStatusKind.REFUSED, aggregator, "cannot prepare: no data")
    assert own_failure(mine)
    assert rejoin_attempt(1, 1, mine, [], set())
