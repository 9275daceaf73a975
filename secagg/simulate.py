"""In-memory simulation: N participants and one aggregator, the same objects a peer drives.

For tests and benchmarks. Dropouts are injected at any stage (a dropped peer never sends its
message for that stage, nor anything later) and the aggregator can be made malicious
(:class:`Attack`), in which case the simulation reports how the honest participants refused.

Timing uses an injected clock (``time.perf_counter`` by default); it only measures, it
never influences the protocol. Byte counts are the sizes of the messages' fields (what the
wire format carries, without its few bytes of framing).

Large complete-graph rounds (n = 500: every participant verifies 500 adverts and ~n
consistency signatures, and expands ~n masks) take minutes in one process. ``timed_sample``
makes them affordable without faking anything: every participant still runs the real
protocol, but only a seed-chosen sample is timed, and the others share a memo of signature
verifications (a verification's result depends only on key, signature and data, so the
memo changes no outcome; the timed sample and the aggregator always verify for real).
Progress is reported through an optional callback, never printed: this package does no I/O.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np

from ._attacks import AGGREGATOR_ID, VIEW_ATTACKS, Attack, revealed_both, tamper, view_attack
from .aggregator import Aggregator
from .config import RoundConfig, Stage
from .crypto import DeterministicRandom, Verifier
from .errors import ConfigError, RemoteProtocolError, RoundAborted, SecAggError
from .graph import (
    GraphKind,
    colluders_per_neighbourhood,
    consistency_quorum,
    neighbourhood_size,
    safe_threshold,
)
from .messages import (
    AggregatorMessage,
    ConsistencySignature,
    MaskedInput,
    ParticipantMessage,
    UnmaskShares,
    message_size,
)
from .participant import Participant, ParticipantState
from .prg import keystream_floor
from .ring import WordArray, word_dtype
from .succinct import SuccinctTranscript, verify_succinct
from .testing import peer_ids, test_identities
from .transcript import Transcript, TranscriptError, verify_transcript

__all__ = [
    "AGGREGATOR_ID",
    "Attack",
    "Progress",
    "SimulationResult",
    "simulate",
    "test_identities",  # the identities the simulator uses (the bench counts their checks)
]

STAGES = tuple(Stage)


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a simulation is: ``done`` of ``total`` participants handled at ``stage``.

    ``finished`` is set once the aggregator has closed the stage.
    """

    stage: Stage
    done: int
    total: int
    finished: bool
    elapsed_s: float


class _MemoVerifier:
    """A verifier that remembers results, shared by the untimed participants of a sample."""

    def __init__(self, inner: Verifier, memo: dict[tuple[int, bytes, bytes], bool]) -> None:
        self._inner = inner
        self._memo = memo

    def verify(self, signature: bytes, data: bytes) -> bool:
        key = (id(self._inner), signature, data)
        known = self._memo.get(key)
        if known is None:
            known = self._memo[key] = self._inner.verify(signature, data)
        return known


@dataclass
class SimulationResult:
    peers: tuple[str, ...]
    aggregate: WordArray | None
    expected: WordArray | None  # plain sum over the survivors' inputs
    survivors: tuple[int, ...]  # 0-based indices
    dropped: dict[str, list[int]]  # per stage, 0-based indices
    # stage (and "total") -> {"aggregator", "participant_median"}; the participant total is
    # the median over participants that sent their unmask shares of their summed stage times;
    # "masked" also has "keystream_floor" (median over the timed participants of their
    # masking's floor, secagg.prg.keystream_floor) and "floor_ratio" (participant / floor)
    timings_s: dict[str, dict[str, float]]
    bytes_per_peer: dict[str, float]  # median participant bytes "sent" and "received"
    ok: bool
    aborted: str | None = None
    refusals: dict[str, str] = field(default_factory=dict)  # peer -> error, under attack
    timed: tuple[int, ...] = ()  # 0-based indices of the participants whose times are reported
    transcript: Transcript | None = None
    transcript_error: str | None = None
    succinct: SuccinctTranscript | None = None  # the same round as the peers verify it


def simulate(
    n_peers: int,
    vector_length: int,
    *,
    threshold: int | None = None,
    graph: GraphKind = GraphKind.COMPLETE,
    degree: int | None = None,
    drops: Mapping[Stage, int] | None = None,
    seed: int = 0,
    inputs: WordArray | None = None,
    bits: int = 32,
    attack: Attack | None = None,
    session_id: str = "simulation",
    round_: int = 0,
    verify: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[Progress], None] | None = None,
    timed_sample: int | None = None,
    colluders: int = 0,
    warm_buffers: bool = True,
) -> SimulationResult:
    """Run one round in memory. See the module docstring.

    Args:
        drops: how many peers drop out at each stage (chosen by ``seed``).
        inputs: an (n_peers, vector_length) array of ring words; random when omitted.
        verify: also run :func:`verify_transcript` on the published transcript.
        progress: called after each participant's message and when each stage closes.
        timed_sample: time only this many participants (see the module docstring).
        colluders: the collusion bound c of the round (sets the quorum and the default,
            lowest safe, threshold). The simulated aggregator is not on the roster.
        warm_buffers: give each participant a touched buffer for y (see the code); False
            makes every masked stage fault in fresh pages, as a peer's first round does.

    Raises:
        ConfigError: invalid parameters (threshold, degree, sizes, inputs). Drops that leave
            fewer than t peers are not an error: the round aborts and ``aborted`` says why
            (see :func:`too_many_drops` to refuse them up front).
    """
    peers = peer_ids(n_peers)
    if threshold is None:
        hood = neighbourhood_size(n_peers, graph, degree)
        threshold = safe_threshold(hood, colluders_per_neighbourhood(n_peers, hood, colluders))
    config = RoundConfig(
        session_id,
        round_,
        peers,
        threshold,
        vector_length,
        bits,
        graph,
        degree,
        colluders=colluders,
    )
    if timed_sample is not None and not 1 <= timed_sample <= n_peers:
        raise ConfigError(f"timed_sample must be between 1 and {n_peers}, not {timed_sample}")
    dtype = word_dtype(bits)
    data_rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = np.asarray(
            data_rng.integers(0, 1 << bits, size=(n_peers, vector_length), dtype=np.uint64)
        ).astype(dtype)
    elif inputs.shape != (n_peers, vector_length) or inputs.dtype != dtype:
        raise ConfigError(
            f"inputs must be a ({n_peers}, {vector_length}) {dtype} array, "
            f"not {inputs.dtype} of shape {inputs.shape}"
        )
    signers, verifiers = test_identities(peers, seed)
    drop_at = _choose_drops(peers, drops or {}, data_rng)
    if timed_sample is None or timed_sample == n_peers:
        timed = frozenset(peers)
    else:
        timed = frozenset(
            peers[int(i)] for i in data_rng.choice(n_peers, size=timed_sample, replace=False)
        )
    memo: dict[tuple[int, bytes, bytes], bool] = {}
    memo_verifiers: Mapping[str, Verifier] = {
        u: _MemoVerifier(v, memo) for u, v in verifiers.items()
    }

    # One process holds every participant's y at once, so each y would be fresh memory the
    # kernel faults in page by page (~1.6 ms for 4 MB), whereas a peer process, holding one
    # round's y at a time, gets the previous round's pages back from its allocator. The y
    # buffers are therefore allocated and touched here, before any timing (BENCHMARKS.md,
    # "Issue 11 (lane 11c)", gives the figure with fresh pages too).
    masked_buffers: WordArray | None = None
    if warm_buffers:
        masked_buffers = np.empty((n_peers, vector_length), dtype=dtype)
        masked_buffers.fill(0)
    participants = {
        u: Participant(
            config,
            u,
            signers[u],
            verifiers if u in timed else memo_verifiers,
            inputs[i],
            DeterministicRandom(f"{seed}/{session_id}/{round_}/{u}"),
            AGGREGATOR_ID,
            masked_buffer=None if masked_buffers is None else masked_buffers[i],
        )
        for i, u in enumerate(peers)
    }
    if attack in VIEW_ATTACKS:
        assert attack is not None
        view_refusals, view_reveals, view_error = view_attack(
            attack, config, participants, verifiers
        )
        return SimulationResult(
            peers=peers,
            aggregate=None,
            expected=None,
            survivors=(),
            dropped={s.value: [] for s in STAGES},
            # Not a performance run: the attack is played outside the timed loop.
            timings_s={
                key: {"aggregator": 0.0, "participant_median": 0.0}
                for key in (*(s.value for s in STAGES), "total")
            },
            bytes_per_peer={"sent": 0.0, "received": 0.0},
            # Detected: honest peers refused (naming the aggregator) or rejected the
            # published transcript, and nobody revealed both shares of one peer.
            ok=bool(view_refusals or view_error) and not revealed_both(view_reveals),
            refusals=view_refusals,
            transcript_error=view_error,
        )
    aggregator = Aggregator(config, verifiers, AGGREGATOR_ID)
    stage_times: dict[Stage, list[float]] = {s: [] for s in STAGES}
    aggregator_times: dict[Stage, float] = {s: 0.0 for s in STAGES}
    participant_totals = dict.fromkeys(peers, 0.0)
    sent = dict.fromkeys(peers, 0)
    received = dict.fromkeys(peers, 0)
    refusals: dict[str, str] = {}
    active = set(peers)

    def deliver(u: str, make: Callable[[], ParticipantMessage], stage: Stage) -> None:
        if drop_at.get(u) == stage:
            active.discard(u)
        if u not in active:
            return
        start = clock()
        try:
            message = make()
        except SecAggError as error:
            refusals[u] = str(error)
            active.discard(u)
            return
        if u in timed:
            elapsed = clock() - start
            stage_times[stage].append(elapsed)
            participant_totals[u] += elapsed
            if isinstance(message, MaskedInput):
                floors.append(_time_floor(floor_works, 1 + len(message.masked_with), config, clock))
        sent[u] += message_size(message)
        if isinstance(message, UnmaskShares):
            reveals.append(message)
            sent_unmask.add(u)
        start = clock()
        try:
            aggregator.receive(message)
        except RemoteProtocolError:
            if attack is Attack.SPLIT_SURVIVORS and isinstance(message, ConsistencySignature):
                split_signatures.append(message)
        aggregator_times[stage] += clock() - start

    # The keystream floor of each timed participant's masking (its self mask and one mask
    # per partner), timed right after its masked stage so that load hits both alike.
    floors: list[float] = []
    floor_works: dict[int, Callable[[], None]] = {}
    split_signatures: list[ConsistencySignature] = []
    reveals: list[UnmaskShares] = []
    sent_unmask: set[str] = set()
    outgoing: dict[str, AggregatorMessage] = {}
    aborted: str | None = None
    began = clock()
    for stage in STAGES:
        todo = [u for u in peers if stage is Stage.ADVERTISE or u in outgoing]
        for done, u in enumerate(todo, start=1):
            participant = participants[u]
            if stage is Stage.ADVERTISE:
                deliver(u, participant.start, stage)
            else:
                message = outgoing[u]
                received[u] += message_size(message)
                deliver(u, partial(participant.receive, message), stage)
            if progress is not None:
                progress(Progress(stage, done, len(todo), False, clock() - began))
        start = clock()
        try:
            outgoing = aggregator.close_stage()
        except (RoundAborted, RemoteProtocolError) as error:
            aborted = str(error)
            aggregator_times[stage] += clock() - start
            break
        aggregator_times[stage] += clock() - start
        if progress is not None:
            progress(Progress(stage, len(todo), len(todo), True, clock() - began))
        if attack is not None:
            outgoing = tamper(attack, stage, outgoing, config, split_signatures, seed)
        if not outgoing and stage is not STAGES[-1]:
            aborted = f"no participant left after stage {stage.value}"
            break

    result = aggregator.result
    survivors = result.survivors if result else ()
    index = {u: i for i, u in enumerate(peers)}
    expected: WordArray | None = None
    if survivors:
        expected = np.zeros(vector_length, dtype=dtype)
        for u in survivors:
            np.add(expected, inputs[index[u]], out=expected)
    transcript = aggregator.transcript() if result else None
    transcript_error = None
    if transcript is not None and attack is Attack.WRONG_SUM:
        wrong = transcript.aggregate.copy()
        wrong[0] += 1
        transcript = replace(transcript, aggregate=wrong)
    succinct = aggregator.succinct_transcript() if result else None
    if succinct is not None and attack is Attack.WRONG_SUM:
        wrong = succinct.statement.aggregate.copy()
        wrong[0] += 1
        succinct = replace(succinct, statement=replace(succinct.statement, aggregate=wrong))
    if transcript is not None and succinct is not None and verify:
        # Both checks: the full transcript's recomputation and the succinct linear check
        # (what the peers run) must agree.
        try:
            verify_transcript(transcript, config, verifiers)
            verify_succinct(succinct, config, verifiers)
        except TranscriptError as error:
            transcript_error = str(error)

    honest_done = all(
        participants[u].state is ParticipantState.DONE
        for u in active
        if u in (result.survivors if result else ())
    )
    correct = (
        result is not None and expected is not None and np.array_equal(result.aggregate, expected)
    )
    if attack is None:
        ok = correct and honest_done and transcript_error is None
    elif attack is Attack.WRONG_SUM:
        ok = transcript_error is not None
    else:
        # Detected: honest peers refused (or the round could not gather t consistent
        # signatures and stopped), and nobody revealed both shares of one peer.
        ok = (bool(refusals) or aborted is not None) and not revealed_both(reveals)

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    dropped = {s.value: sorted(index[u] for u in (aggregator.dropped.get(s, ()))) for s in STAGES}
    timings_s = {
        s.value: {
            "aggregator": aggregator_times[s],
            "participant_median": median(stage_times[s]),
        }
        for s in STAGES
    }
    masked = timings_s[Stage.MASKED.value]
    masked["keystream_floor"] = median(floors)
    masked["floor_ratio"] = (
        masked["participant_median"] / masked["keystream_floor"] if floors else 0.0
    )
    finishers = [u for u in timed if u in sent_unmask] or list(timed)
    timings_s["total"] = {
        "aggregator": sum(aggregator_times.values()),
        "participant_median": median([participant_totals[u] for u in finishers]),
    }
    return SimulationResult(
        peers=peers,
        aggregate=result.aggregate if result else None,
        expected=expected,
        survivors=tuple(index[u] for u in survivors),
        dropped=dropped,
        timings_s=timings_s,
        bytes_per_peer={
            "sent": float(statistics.median(sent.values())),
            "received": float(statistics.median(received.values())),
        },
        ok=ok,
        aborted=aborted,
        refusals=refusals,
        transcript=transcript,
        transcript_error=transcript_error,
        succinct=succinct,
        timed=tuple(sorted(index[u] for u in timed)),
    )


def _time_floor(
    works: dict[int, Callable[[], None]],
    n_masks: int,
    config: RoundConfig,
    clock: Callable[[], float],
) -> float:
    """One timing of :func:`~secagg.prg.keystream_floor` for ``n_masks`` (its buffers made
    once per count, untimed, as the participants' are)."""
    work = works.get(n_masks)
    if work is None:
        work = works[n_masks] = keystream_floor(n_masks, config.vector_length, config.bits)
    start = clock()
    work()
    return clock() - start


def too_many_drops(
    n_peers: int, threshold: int, drops: Mapping[Stage, int], colluders: int = 0
) -> str | None:
    """Why ``drops`` certainly abort the round (fewer than t peers left to unmask, or fewer
    than the consistency quorum left to sign), or None.

    :func:`simulate` runs such a round anyway and records the clean abort; callers that
    want to refuse the parameters up front (the CLI) ask this first.
    """
    total = sum(drops.values())
    quorum = consistency_quorum(n_peers, colluders)
    needed = max(threshold, quorum)
    if n_peers - total >= needed:
        return None
    what = f"the threshold {threshold}" if threshold >= quorum else f"the quorum {quorum}"
    return (
        f"{total} dropouts leave {n_peers - total} of {n_peers} peers, fewer than "
        f"{what}: at most {n_peers - needed} peers may drop"
    )


def _choose_drops(
    peers: Sequence[str], drops: Mapping[Stage, int], rng: np.random.Generator
) -> dict[str, Stage]:
    remaining = list(peers)
    chosen: dict[str, Stage] = {}
    for stage in STAGES:
        count = drops.get(stage, 0)
        if count < 0 or count > len(remaining):
            raise ConfigError(
                f"cannot drop {count} peers at {stage.value}: {len(remaining)} remain"
            )
        picks = [int(p) for p in rng.choice(len(remaining), size=count, replace=False)]
        for i in sorted(picks, reverse=True):
            chosen[remaining.pop(i)] = stage
    return chosen
