"""An in-memory Paillier round for tests and benchmarks (:func:`simulate_paillier`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from ..config import RoundConfig
from ..crypto import DeterministicRandom
from ..errors import (
    ConfigError,
    RoundAborted,
)
from ..ring import WordArray, word_dtype
from ..testing import peer_ids, test_identities
from ..transcript import TranscriptError
from .aggregator import PaillierAggregator, PaillierStage, PaillierTranscript
from .config import AGGREGATOR, DEFAULT_KEY_BITS, PaillierConfig
from .encoding import _int_bytes
from .key_holder import PaillierKeyHolder
from .keys import PaillierKeyGenerator, SeededPrimes
from .messages import PaillierAggregatorMessage, PaillierParticipantMessage, message_size
from .participant import PaillierParticipant
from .verify import verify_paillier_transcript


@dataclass
class PaillierSimulationResult:
    """One in-memory round. Times are seconds; participant figures are medians over peers."""

    peers: tuple[str, ...]
    key_holder: str
    aggregate: WordArray | None
    expected: WordArray | None  # plain sum over the contributors' inputs
    survivors: tuple[int, ...]  # 0-based indices of the contributors
    timings_s: dict[str, float]
    bytes_per_peer: dict[str, float]
    ciphertexts_per_peer: int
    ok: bool
    aborted: str | None = None
    transcript: PaillierTranscript | None = None
    transcript_error: str | None = None
    transcript_bytes: int = 0


def simulate_paillier(
    n_peers: int,
    vector_length: int,
    *,
    threshold: int | None = None,
    key_bits: int = DEFAULT_KEY_BITS,
    packed: bool = True,
    drops: Mapping[PaillierStage, int] | None = None,
    seed: int = 0,
    inputs: WordArray | None = None,
    bits: int = 32,
    key_holder: int = 0,
    keygen: PaillierKeyGenerator | None = None,
    session_id: str = "simulation",
    round_: int = 0,
    verify: bool = True,
    insecure_small_keys: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> PaillierSimulationResult:
    """Run one Paillier round in memory with the same objects a peer drives.

    Args:
        drops: how many peers (never the key holder) miss the input or endorse stage.
        inputs: an (n_peers, vector_length) array of ring words; random when omitted.
        key_holder: index of the key holder in the roster. The aggregator is an extra party.
        keygen: default :class:`SeededPrimes` from the seed (reproducible); benchmarks pass
            :class:`OpenSSLPrimes` to time the production path.
        verify: also run :func:`verify_paillier_transcript` (timed as ``verify``).

    Raises:
        ConfigError: invalid parameters.
    """
    peers = peer_ids(n_peers)
    if threshold is None:
        threshold = n_peers // 2 + 1
    round_config = RoundConfig(session_id, round_, peers, threshold, vector_length, bits)
    if not 0 <= key_holder < n_peers:
        raise ConfigError(f"key holder index must be below {n_peers}, not {key_holder}")
    config = PaillierConfig(
        round_config, peers[key_holder], key_bits, packed, insecure_small_keys=insecure_small_keys
    )
    dtype = word_dtype(bits)
    data_rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = np.asarray(
            data_rng.integers(0, 1 << bits, size=(n_peers, vector_length), dtype=np.uint64)
        ).astype(dtype)
    elif inputs.shape != (n_peers, vector_length) or inputs.dtype != dtype:
        raise ConfigError(f"inputs must be a ({n_peers}, {vector_length}) {dtype} array")
    drop_at: dict[str, PaillierStage] = {}
    candidates = [u for u in peers if u != config.key_holder]
    for stage in (PaillierStage.INPUT, PaillierStage.ENDORSE):
        count = (drops or {}).get(stage, 0)
        if not 0 <= count <= len(candidates):
            raise ConfigError(f"cannot drop {count} peers at {stage.value}")
        for i in sorted(data_rng.choice(len(candidates), size=count, replace=False))[::-1]:
            drop_at[candidates.pop(int(i))] = stage
    signers, verifiers = test_identities(peers, seed)
    holder = PaillierKeyHolder(
        config,
        config.key_holder,
        signers[config.key_holder],
        verifiers,
        keygen if keygen is not None else SeededPrimes(DeterministicRandom(f"{seed}/keygen")),
        AGGREGATOR,
    )
    participants = {
        u: PaillierParticipant(
            config,
            u,
            signers[u],
            verifiers,
            inputs[i],
            DeterministicRandom(f"{seed}/{session_id}/{round_}/{u}/paillier"),
            AGGREGATOR,
        )
        for i, u in enumerate(peers)
    }
    aggregator = PaillierAggregator(config, verifiers, AGGREGATOR)
    times: dict[str, float] = dict.fromkeys(
        ("key_holder_keygen", "key_holder_decrypt", "aggregator", "verify"), 0.0
    )
    encrypt_s = dict.fromkeys(peers, 0.0)
    endorse_s: dict[str, float] = {}
    sent = dict.fromkeys(peers, 0)
    received = dict.fromkeys(peers, 0)

    def to_aggregator(message: PaillierParticipantMessage) -> None:
        start = clock()
        aggregator.receive(message)
        times["aggregator"] += clock() - start

    def close() -> dict[str, PaillierAggregatorMessage]:
        start = clock()
        try:
            return aggregator.close_stage()
        finally:
            times["aggregator"] += clock() - start

    aborted: str | None = None
    began = clock()
    try:
        start = clock()
        announcement = holder.start()
        times["key_holder_keygen"] = clock() - start
        sent[config.key_holder] += message_size(announcement)
        to_aggregator(announcement)
        outgoing = close()
        for stage in (PaillierStage.INPUT, PaillierStage.ENDORSE):
            for u, message in outgoing.items():
                received[u] += message_size(message)
                if drop_at.get(u) is stage:
                    continue
                start = clock()
                reply = participants[u].receive(message)
                (encrypt_s if stage is PaillierStage.INPUT else endorse_s)[u] = clock() - start
                sent[u] += message_size(reply)
                to_aggregator(reply)
            outgoing = close()
        request = outgoing[config.key_holder]
        received[config.key_holder] += message_size(request)
        start = clock()
        decrypted = holder.receive(request)
        times["key_holder_decrypt"] = clock() - start
        sent[config.key_holder] += message_size(decrypted)
        to_aggregator(decrypted)
        close()
    except RoundAborted as error:
        aborted = str(error)
    times["wall"] = clock() - began

    result = aggregator.result
    expected: WordArray | None = None
    survivors: tuple[int, ...] = ()
    transcript: PaillierTranscript | None = None
    transcript_error: str | None = None
    transcript_bytes = 0
    if result is not None:
        survivors = tuple(peers.index(u) for u in result.survivors)
        expected = np.zeros(vector_length, dtype=dtype)
        for i in survivors:
            np.add(expected, inputs[i], out=expected)
        reader = next(u for u in peers if u != config.key_holder)
        published = aggregator.transcript(reader)
        assert isinstance(published, PaillierTranscript)
        transcript = published
        transcript_bytes = (
            message_size(transcript.key)
            + sum(message_size(m) for m in transcript.inputs)
            + sum(len(_int_bytes(c)) for c in transcript.aggregate)
            + sum(message_size(e) for e in transcript.endorsements)
            + message_size(transcript.decryption)
        )
        if verify:
            start = clock()
            try:
                verify_paillier_transcript(transcript, config, verifiers)
            except TranscriptError as error:
                transcript_error = str(error)
            times["verify"] = clock() - start
    times["key_holder_total"] = times["key_holder_keygen"] + times["key_holder_decrypt"]
    times["participant_encrypt"] = statistics.median(encrypt_s.values())
    times["participant_endorse"] = statistics.median(endorse_s.values()) if endorse_s else 0.0
    times["participant_total"] = statistics.median(
        encrypt_s[u] + endorse_s.get(u, 0.0) for u in peers
    )
    ok = (
        result is not None
        and expected is not None
        and np.array_equal(result.aggregate, expected)
        and transcript_error is None
    )
    others = [u for u in peers if u != config.key_holder]
    return PaillierSimulationResult(
        peers=peers,
        key_holder=config.key_holder,
        aggregate=result.aggregate if result else None,
        expected=expected,
        survivors=survivors,
        timings_s=times,
        bytes_per_peer={
            "sent": float(statistics.median(sent[u] for u in others)),
            "received": float(statistics.median(received[u] for u in others)),
            "key_holder_sent": float(sent[config.key_holder]),
            "key_holder_received": float(received[config.key_holder]),
        },
        ciphertexts_per_peer=config.ciphertext_count,
        ok=ok,
        aborted=aborted,
        transcript=transcript,
        transcript_error=transcript_error,
        transcript_bytes=transcript_bytes,
    )
