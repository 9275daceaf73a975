"""Helpers shared by the secagg tests: a round driven by hand, stage by stage.

Deliberately not a ``conftest.py`` nor a package: ``tests/secagg/__init__.py`` would make
pytest import these tests as a package named ``secagg`` (shadowing the code under test), and a
second ``conftest`` module anywhere under ``tests/`` would clash under ``mypy``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from unittest import mock

import numpy as np

from secagg import (
    AdvertiseKeys,
    Aggregator,
    AggregatorMessage,
    DeterministicRandom,
    GraphKind,
    Participant,
    ParticipantMessage,
    RoundAborted,
    RoundConfig,
    Signer,
    UnmaskShares,
    Verifier,
    testing,
)
from secagg import simulate as simulation
from secagg.graph import colluders_per_neighbourhood, neighbourhood_size, safe_threshold
from secagg.ring import WordArray, word_dtype

AGGREGATOR = "the-aggregator"
SESSION = "test-session"


class FixedBytes:
    """A RandomSource that hands out exactly the given bytes, then refuses."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def token_bytes(self, n: int) -> bytes:
        if n > len(self._data):
            raise AssertionError(f"{n} random bytes requested, only {len(self._data)} left")
        out, self._data = self._data[:n], self._data[n:]
        return out


def identities(
    peers: Iterable[str], seed: int = 0
) -> tuple[dict[str, Signer], dict[str, Verifier]]:
    """Deterministic Ed25519 identities (the simulator's, so the two can be mixed)."""
    return testing.test_identities(tuple(peers), seed)


@dataclass
class Round:
    """One round with every participant and the aggregator in memory, driven by the test."""

    config: RoundConfig
    signers: dict[str, Signer]
    verifiers: dict[str, Verifier]
    inputs: dict[str, WordArray]
    participants: dict[str, Participant]
    aggregator: Aggregator
    log: list[str] = field(default_factory=list)

    @property
    def peers(self) -> tuple[str, ...]:
        return self.config.peers

    def start(self, skip: Iterable[str] = ()) -> dict[str, ParticipantMessage]:
        skipped = set(skip)
        return {u: p.start() for u, p in self.participants.items() if u not in skipped}

    def respond(
        self, outgoing: Mapping[str, AggregatorMessage], skip: Iterable[str] = ()
    ) -> dict[str, ParticipantMessage]:
        """Deliver the aggregator's messages; return the participants' replies."""
        skipped = set(skip)
        return {u: self.participants[u].receive(m) for u, m in outgoing.items() if u not in skipped}

    def collect(self, replies: Mapping[str, ParticipantMessage]) -> dict[str, AggregatorMessage]:
        """Feed replies to the aggregator and close its stage."""
        for message in replies.values():
            self.aggregator.receive(message)
        return self.aggregator.close_stage()

    def advance(
        self, stages: int, drop: Mapping[int, Iterable[str]] | None = None
    ) -> dict[str, AggregatorMessage]:
        """Run ``stages`` stages honestly (peers in ``drop[i]`` stay silent at stage i).

        Returns what the aggregator sends after the last stage run.
        """
        drop = drop or {}
        outgoing = self.collect(self.start(skip=drop.get(0, ())))
        for i in range(1, stages):
            outgoing = self.collect(self.respond(outgoing, skip=drop.get(i, ())))
        return outgoing

    def expected_sum(self, peers: Iterable[str]) -> WordArray:
        total = np.zeros(self.config.vector_length, dtype=word_dtype(self.config.bits))
        for u in peers:
            np.add(total, self.inputs[u], out=total)
        return total

    def sign_as(self, peer: str, message: AdvertiseKeys) -> AdvertiseKeys:
        """Re-sign an advert with ``peer``'s key (a malicious but authentic participant)."""
        return replace(
            message, signature=self.signers[peer].sign(message.signed_payload(self.config.digest))
        )


def default_threshold(n: int, graph: GraphKind, degree: int | None, colluders: int = 0) -> int:
    h = neighbourhood_size(n, graph, degree)
    return safe_threshold(h, colluders_per_neighbourhood(n, h, colluders))


def peer_names(n: int) -> tuple[str, ...]:
    return tuple(f"hospital-{chr(ord('a') + i)}" for i in range(n))


def make_round(
    n: int = 5,
    *,
    threshold: int | None = None,
    length: int = 4,
    round_: int = 0,
    session: str = SESSION,
    graph: GraphKind = GraphKind.COMPLETE,
    degree: int | None = None,
    bits: int = 32,
    seed: int = 0,
    peers: tuple[str, ...] | None = None,
    colluders: int = 0,
    attempt: int = 0,
    beacon: bytes = b"",
) -> Round:
    """A fresh round. Same arguments, same keys and messages (everything is seeded).

    The threshold defaults to the lowest safe one against ``colluders``."""
    roster = peers or peer_names(n)
    if threshold is None:
        threshold = default_threshold(len(roster), graph, degree, colluders)
    config = RoundConfig(
        session,
        round_,
        roster,
        threshold,
        length,
        bits,
        graph,
        degree,
        colluders=colluders,
        attempt=attempt,
        beacon=beacon,
    )
    signers, verifiers = identities(roster, seed)
    data = np.random.default_rng(seed)
    dtype = word_dtype(bits)
    inputs = {
        u: np.asarray(data.integers(0, 1 << bits, size=length, dtype=np.uint64)).astype(dtype)
        for u in roster
    }
    participants = {
        u: Participant(
            config,
            u,
            signers[u],
            verifiers,
            inputs[u],
            DeterministicRandom(f"{seed}/{session}/{round_}/{u}"),
            AGGREGATOR,
        )
        for u in roster
    }
    return Round(
        config, signers, verifiers, inputs, participants, Aggregator(config, verifiers, AGGREGATOR)
    )


def spy_simulate(**kwargs: object) -> tuple[simulation.SimulationResult, list[UnmaskShares]]:
    """simulate(), also recording every UnmaskShares that reached the aggregator."""
    reveals: list[UnmaskShares] = []
    receive = Aggregator.receive

    def spy(self: Aggregator, message: ParticipantMessage) -> None:
        if isinstance(message, UnmaskShares):
            reveals.append(message)
        receive(self, message)

    with mock.patch.object(Aggregator, "receive", spy):
        result = simulation.simulate(**kwargs)  # type: ignore[arg-type]
    return result, reveals


def revealed_both(reveals: list[UnmaskShares]) -> set[str]:
    self_masks = {owner for r in reveals for owner, _ in r.self_mask_shares}
    mask_keys = {owner for r in reveals for owner, _ in r.mask_key_shares}
    return self_masks & mask_keys


def run_with_drops(r: Round, drop_at: Mapping[str, int]) -> tuple[str | None, list[UnmaskShares]]:
    """Drive ``r`` with peer u silent from stage ``drop_at[u]`` (0..4) on, as the simulator does.

    Returns (the abort reason or None, every UnmaskShares that was sent).
    """
    reveals: list[UnmaskShares] = []
    outgoing: dict[str, AggregatorMessage] = {}
    for index in range(5):
        silent = {u for u, at in drop_at.items() if at <= index}
        replies = r.start(skip=silent) if index == 0 else r.respond(outgoing, skip=silent)
        reveals += [m for m in replies.values() if isinstance(m, UnmaskShares)]
        try:
            outgoing = r.collect(replies)
        except RoundAborted as error:
            return str(error), reveals
        if not outgoing and index < 4:
            return "nobody left", reveals
    return None, reveals
