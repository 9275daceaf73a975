"""Paillier aggregation: sums, dropouts, refusals naming the offender, transcript checks.

Keys here are 512 bits (one test uses 1024) so that the file runs in seconds: such keys are
insecure and the config refuses them unless ``insecure_small_keys=True``, which only tests
and quick benchmarks set. Key generation uses :class:`SeededPrimes` with a fixed seed, so
every key is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import (
    ConfigError,
    DeterministicRandom,
    InvalidSignatureError,
    LocalProtocolError,
    RemoteProtocolError,
    RoundAborted,
    RoundConfig,
    Signer,
    TranscriptError,
    Verifier,
    testing,
)
from secagg.paillier import (
    DecryptedSum,
    DecryptionRequest,
    EncryptedInput,
    Endorsement,
    InputsToCheck,
    KeyAnnouncement,
    KeyHolderState,
    PaillierAggregator,
    PaillierAggregatorMessage,
    PaillierAggregatorState,
    PaillierConfig,
    PaillierKeyHolder,
    PaillierParticipant,
    PaillierParticipantState,
    PaillierPeer,
    PaillierStage,
    PaillierTranscript,
    RedactedPaillierTranscript,
    SeededPrimes,
    aggregate_digest,
    pack,
    simulate_paillier,
    unpack,
    verify_paillier_transcript,
)
from secagg.ring import WordArray
from secagg.testing import peer_ids

KEY_BITS = 512
AGG = "the-aggregator"
SESSION = "paillier-test"


def make_config(
    n: int, m: int, *, packed: bool = True, round_: int = 0, key_bits: int = KEY_BITS
) -> PaillierConfig:
    peers = peer_ids(n)
    return PaillierConfig(
        RoundConfig(SESSION, round_, peers, n // 2 + 1, m),
        peers[0],
        key_bits,
        packed,
        insecure_small_keys=True,
    )


def random_inputs(n: int, m: int, seed: int) -> WordArray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << 32, size=(n, m), dtype=np.uint64).astype(np.uint32)


@dataclass
class Round:
    """One Paillier round in memory, driven stage by stage by the test."""

    config: PaillierConfig
    inputs: WordArray
    seed: int = 0
    signers: dict[str, Signer] = field(init=False)
    verifiers: dict[str, Verifier] = field(init=False)
    holder: PaillierKeyHolder = field(init=False)
    participants: dict[str, PaillierParticipant] = field(init=False)
    aggregator: PaillierAggregator = field(init=False)
    modulus: int = 0

    def __post_init__(self) -> None:
        peers = self.config.round.peers
        self.signers, self.verifiers = testing.test_identities(peers, self.seed)
        kh = self.config.key_holder
        self.holder = PaillierKeyHolder(
            self.config,
            kh,
            self.signers[kh],
            self.verifiers,
            SeededPrimes(DeterministicRandom(f"key/{self.seed}/{self.config.round.round}")),
            AGG,
        )
        self.participants = {
            u: PaillierParticipant(
                self.config,
                u,
                self.signers[u],
                self.verifiers,
                self.inputs[i],
                DeterministicRandom(f"enc/{self.seed}/{u}"),
                AGG,
            )
            for i, u in enumerate(peers)
        }
        self.aggregator = PaillierAggregator(self.config, self.verifiers, AGG)

    def key_stage(self) -> dict[str, PaillierAggregatorMessage]:
        announcement = self.holder.start()
        self.modulus = announcement.modulus
        self.aggregator.receive(announcement)
        return self.aggregator.close_stage()

    def input_stage(self, skip: frozenset[str] = frozenset()) -> dict[str, EncryptedInput]:
        outgoing = self.key_stage()
        sent: dict[str, EncryptedInput] = {}
        for u, message in outgoing.items():
            if u not in skip:
                reply = self.participants[u].receive(message)
                assert isinstance(reply, EncryptedInput)
                sent[u] = reply
        return sent

    def endorse_stage(self, skip: frozenset[str] = frozenset()) -> DecryptionRequest:
        for encrypted in self.input_stage(skip).values():
            self.aggregator.receive(encrypted)
        outgoing = self.aggregator.close_stage()
        for u, message in outgoing.items():
            self.aggregator.receive(self.participants[u].receive(message))
        request = self.aggregator.close_stage()[self.config.key_holder]
        assert isinstance(request, DecryptionRequest)
        return request

    def run(self, skip: frozenset[str] = frozenset()) -> WordArray:
        self.aggregator.receive(self.holder.receive(self.endorse_stage(skip)))
        self.aggregator.close_stage()
        assert self.aggregator.result is not None
        return self.aggregator.result.aggregate

    def expected(self, contributors: tuple[str, ...]) -> WordArray:
        peers = self.config.round.peers
        total = np.zeros(self.config.round.vector_length, dtype=np.uint32)
        for u in contributors:
            np.add(total, self.inputs[peers.index(u)], out=total)
        return total


def full_transcript(round_: Round, recipient: str) -> PaillierTranscript:
    transcript = round_.aggregator.transcript(recipient)
    assert isinstance(transcript, PaillierTranscript)
    return transcript


def resign(message: EncryptedInput, signer: Signer, config: PaillierConfig) -> EncryptedInput:
    return replace(message, signature=signer.sign(message.signed_payload(config.digest)))


# ------------------------------------------------------------------ packing


def test_pack_known_answer() -> None:
    config = make_config(3, 3)  # slots of 32 + 2 bits
    assert config.slot_bits == 34
    assert pack(np.array([1, 2, 3], dtype=np.uint32), config) == (1 + (2 << 34) + (3 << 68),)


def test_pack_unpack_round_trip_at_the_limits() -> None:
    config = make_config(5, 40)
    top = np.full(40, 0xFFFFFFFF, dtype=np.uint32)
    # Five maximal words per slot must not carry into the next slot.
    summed = tuple(5 * p for p in pack(top, config))
    assert np.array_equal(unpack(summed, config), (top.astype(np.uint64) * 5 % (1 << 32)))
    assert config.ciphertext_count == -(-40 // config.slots)
    assert config.slots == (KEY_BITS - 1) // 35


def test_unpack_refuses_overflowing_plaintext() -> None:
    config = make_config(3, 3)
    with pytest.raises(ValueError, match="overflows"):
        unpack((1 << (3 * config.slot_bits),), config)


# ------------------------------------------------------------------ correct sums


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("n", [3, 4, 5])
def test_sum_is_correct_mod_2_32(n: int, packed: bool) -> None:
    m = 37 if packed else 9
    round_ = Round(make_config(n, m, packed=packed), random_inputs(n, m, seed=n))
    aggregate = round_.run()
    assert np.array_equal(aggregate, round_.expected(round_.config.round.peers))
    transcript = full_transcript(round_, round_.config.round.peers[1])
    verified = verify_paillier_transcript(transcript, round_.config, round_.verifiers)
    assert np.array_equal(verified.aggregate, aggregate)
    assert round_.holder.verified is not None
    assert np.array_equal(round_.holder.verified.aggregate, aggregate)


def test_all_maximal_inputs_do_not_overflow() -> None:
    n, m = 5, 30
    inputs = np.full((n, m), 0xFFFFFFFF, dtype=np.uint32)
    round_ = Round(make_config(n, m), inputs)
    assert np.array_equal(round_.run(), round_.expected(round_.config.round.peers))


def test_1024_bit_key_and_simulator() -> None:
    result = simulate_paillier(3, 200, key_bits=1024, insecure_small_keys=True, seed=7)
    assert result.ok, (result.aborted, result.transcript_error)
    assert result.expected is not None
    assert result.aggregate is not None
    assert np.array_equal(result.aggregate, result.expected)
    assert result.ciphertexts_per_peer == -(-200 // (1023 // 34))


# ------------------------------------------------------------------ dropouts


def test_peer_that_does_not_send_is_not_in_the_sum() -> None:
    n, m = 5, 20
    round_ = Round(make_config(n, m), random_inputs(n, m, seed=1))
    absent = round_.config.round.peers[3]
    aggregate = round_.run(skip=frozenset({absent}))
    result = round_.aggregator.result
    assert result is not None
    assert absent not in result.survivors
    assert result.dropped[PaillierStage.INPUT] == (absent,)
    assert np.array_equal(aggregate, round_.expected(result.survivors))
    assert not np.array_equal(aggregate, round_.expected(round_.config.round.peers))


def test_too_few_endorsers_aborts_before_decryption() -> None:
    # Three peers, t = 2: the key holder cannot endorse, so both others must contribute.
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=2))
    for message in round_.input_stage(skip=frozenset({"peer-002"})).values():
        round_.aggregator.receive(message)
    with pytest.raises(RoundAborted, match="besides the key holder"):
        round_.aggregator.close_stage()


def test_simulator_with_dropouts() -> None:
    result = simulate_paillier(
        5, 30, key_bits=KEY_BITS, insecure_small_keys=True, drops={PaillierStage.ENDORSE: 1}
    )
    assert result.ok
    assert len(result.survivors) == 5  # dropped after sending its input: still in the sum


# ------------------------------------------------------------------ refusals naming the sender


def test_forged_input_signature_is_refused_naming_the_sender() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=3))
    sent = round_.input_stage()
    forged = replace(sent["peer-001"], signature=sent["peer-002"].signature)
    with pytest.raises(InvalidSignatureError) as caught:
        round_.aggregator.receive(forged)
    assert caught.value.offender == "peer-001"
    assert "peer-001" not in round_.aggregator.pending()  # left out of the round


def test_input_signed_by_another_peer_is_refused() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=3))
    sent = round_.input_stage()
    impostor = resign(sent["peer-001"], round_.signers["peer-002"], round_.config)
    with pytest.raises(InvalidSignatureError) as caught:
        round_.aggregator.receive(impostor)
    assert caught.value.offender == "peer-001"


def test_wrong_ciphertext_count_is_refused_naming_the_sender() -> None:
    round_ = Round(make_config(3, 40), random_inputs(3, 40, seed=4))
    sent = round_.input_stage()
    short = resign(
        replace(sent["peer-002"], ciphertexts=sent["peer-002"].ciphertexts[:-1]),
        round_.signers["peer-002"],
        round_.config,
    )
    with pytest.raises(RemoteProtocolError, match="ciphertexts, expected") as caught:
        round_.aggregator.receive(short)
    assert caught.value.offender == "peer-002"


def test_ciphertext_outside_the_group_is_refused() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=4))
    sent = round_.input_stage()
    bad = resign(
        replace(
            sent["peer-001"], ciphertexts=(round_.modulus,) * len(sent["peer-001"].ciphertexts)
        ),
        round_.signers["peer-001"],
        round_.config,
    )
    with pytest.raises(RemoteProtocolError, match="not a valid Paillier ciphertext") as caught:
        round_.aggregator.receive(bad)
    assert caught.value.offender == "peer-001"


def test_replay_from_another_round_is_refused_naming_the_sender() -> None:
    inputs = random_inputs(3, 10, seed=5)
    old = Round(make_config(3, 10, round_=0), inputs).input_stage()["peer-001"]
    current = Round(make_config(3, 10, round_=1), inputs)
    current.input_stage()
    with pytest.raises(RemoteProtocolError, match="replayed") as caught:
        current.aggregator.receive(old)
    assert caught.value.offender == "peer-001"
    # The same bytes relabelled as this round no longer verify.
    relabelled = replace(old, round=1)
    fresh = Round(make_config(3, 10, round_=1), inputs)
    fresh.input_stage()
    with pytest.raises(InvalidSignatureError) as caught_again:
        fresh.aggregator.receive(relabelled)
    assert caught_again.value.offender == "peer-001"


def test_participant_refuses_a_key_not_signed_by_the_key_holder() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=6))
    announcement = round_.holder.start()
    forged = replace(
        announcement,
        signature=round_.signers["peer-001"].sign(
            announcement.signed_payload(round_.config.digest)
        ),
    )
    participant = round_.participants["peer-002"]
    with pytest.raises(InvalidSignatureError) as caught:
        participant.receive(forged)
    assert caught.value.offender == AGG
    assert participant.state is PaillierParticipantState.FAILED
    with pytest.raises(LocalProtocolError):
        participant.receive(announcement)  # finished after an error


def test_participant_refuses_to_endorse_an_altered_or_thin_set() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=7))
    for message in round_.input_stage().values():
        round_.aggregator.receive(message)
    outgoing = round_.aggregator.close_stage()
    check = outgoing["peer-001"]
    assert isinstance(check, InputsToCheck)
    without_me = replace(check, inputs=tuple(m for m in check.inputs if m.sender != "peer-001"))
    with pytest.raises(RemoteProtocolError, match="my own input") as caught:
        round_.participants["peer-001"].receive(without_me)
    assert caught.value.offender == AGG
    # Only the victim and the key holder: a "sum" the key holder would reveal to the aggregator.
    thin = replace(check, inputs=tuple(m for m in check.inputs if m.sender != "peer-001"))
    with pytest.raises(RemoteProtocolError, match="threshold"):
        round_.participants["peer-002"].receive(
            replace(thin, inputs=tuple(m for m in thin.inputs if m.sender == "peer-002"))
        )


def test_key_holder_never_sees_inputs_and_decrypts_once() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=8))
    request = round_.endorse_stage()
    # The aggregator addresses no InputsToCheck to the key holder...
    assert round_.participants["peer-000"].state is PaillierParticipantState.DONE
    # ...and refuses to give it the transcript.
    decrypted = round_.holder.receive(request)
    round_.aggregator.receive(decrypted)
    round_.aggregator.close_stage()
    # ...and gives it a transcript with input digests only, which it can still verify.
    redacted = round_.aggregator.transcript("peer-000")
    assert isinstance(redacted, RedactedPaillierTranscript)
    own = round_.participants["peer-000"].sent_input
    verified = verify_paillier_transcript(
        redacted, round_.config, round_.verifiers, own=own, me="peer-000"
    )
    assert np.array_equal(verified.aggregate, round_.expected(round_.config.round.peers))
    # A full transcript sent to the key holder is reported as the leak it is.
    full = round_.aggregator.transcript("peer-001")
    with pytest.raises(TranscriptError, match="exposed") as leaked:
        verify_paillier_transcript(full, round_.config, round_.verifiers, me="peer-000")
    assert leaked.value.offender == AGG
    # A redacted transcript that drops the key holder's own input is refused.
    dropped = replace(redacted, contributions=redacted.contributions[1:])
    with pytest.raises(TranscriptError):
        verify_paillier_transcript(dropped, round_.config, round_.verifiers, own=own)
    # A second request (e.g. over a subset, to subtract) is refused.
    with pytest.raises(RemoteProtocolError) as caught:
        round_.holder.receive(request)
    assert caught.value.offender == AGG
    assert round_.holder.state is KeyHolderState.FAILED


def test_key_holder_refuses_a_request_without_enough_endorsements() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=9))
    request = round_.endorse_stage()
    single = replace(request, endorsements=request.endorsements[:1])
    with pytest.raises(RemoteProtocolError, match="endorsements") as caught:
        round_.holder.receive(single)
    assert caught.value.offender == AGG


def test_key_holder_refuses_a_single_input_dressed_as_the_sum() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=10))
    sent = round_.input_stage()
    for encrypted in sent.values():
        round_.aggregator.receive(encrypted)
    for u, check in round_.aggregator.close_stage().items():
        round_.aggregator.receive(round_.participants[u].receive(check))
    request = round_.aggregator.close_stage()["peer-000"]
    assert isinstance(request, DecryptionRequest)
    lone = replace(request, aggregate=sent["peer-001"].ciphertexts)
    with pytest.raises(InvalidSignatureError, match="endorsement") as caught:
        round_.holder.receive(lone)
    assert caught.value.offender == AGG


def test_forged_endorsement_is_refused_naming_the_sender() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=11))
    for message in round_.input_stage().values():
        round_.aggregator.receive(message)
    round_.aggregator.close_stage()
    forged = Endorsement("peer-002", SESSION, 0, round_.signers["peer-002"].sign(b"other"))
    with pytest.raises(InvalidSignatureError) as caught:
        round_.aggregator.receive(forged)
    assert caught.value.offender == "peer-002"


def test_wrong_decryption_is_refused_naming_the_key_holder() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=12))
    request = round_.endorse_stage()
    honest = round_.holder.receive(request)
    lie = _resigned_lie(round_, honest, request)
    with pytest.raises(RemoteProtocolError, match="proof") as caught:
        round_.aggregator.receive(lie)
    assert caught.value.offender == "peer-000"
    with pytest.raises(RoundAborted):
        round_.aggregator.close_stage()


def _resigned_lie(round_: Round, honest: DecryptedSum, request: DecryptionRequest) -> DecryptedSum:
    plaintexts = (honest.plaintexts[0] + 1, *honest.plaintexts[1:])
    lie = replace(honest, plaintexts=plaintexts)
    payload = lie.signed_payload(
        round_.config.digest, request.contributions, aggregate_digest(request.aggregate)
    )
    return replace(lie, signature=round_.signers["peer-000"].sign(payload))


# ------------------------------------------------------------------ transcript


def test_transcripts_give_the_key_holder_the_redacted_one_and_the_others_one_full_one() -> None:
    round_ = finished_round(seed=9)
    peers = round_.config.round.peers
    sent = round_.aggregator.transcripts(peers)
    assert isinstance(sent[peers[0]], RedactedPaillierTranscript)  # peers[0] holds the key
    assert isinstance(sent[peers[1]], PaillierTranscript)
    assert sent[peers[1]] is sent[peers[2]]


def finished_round(seed: int) -> Round:
    round_ = Round(make_config(3, 25), random_inputs(3, 25, seed=seed))
    round_.run()
    return round_


def test_transcript_catches_a_wrong_aggregate_ciphertext() -> None:
    round_ = finished_round(13)
    transcript = full_transcript(round_, "peer-001")
    other = transcript.inputs[1].ciphertexts
    tampered = replace(transcript, aggregate=other)
    with pytest.raises(TranscriptError, match="not the product") as caught:
        verify_paillier_transcript(tampered, round_.config, round_.verifiers)
    assert caught.value.offender == AGG


def test_transcript_catches_a_dropped_or_altered_input() -> None:
    round_ = finished_round(14)
    transcript = full_transcript(round_, "peer-001")
    mine = round_.participants["peer-001"].sent_input
    assert mine is not None
    without = replace(transcript, inputs=transcript.inputs[:1] + transcript.inputs[2:])
    with pytest.raises(TranscriptError):
        verify_paillier_transcript(without, round_.config, round_.verifiers, own=mine)
    altered = replace(mine, ciphertexts=(*mine.ciphertexts[:-1], mine.ciphertexts[-1] + 1))
    with pytest.raises(TranscriptError, match="invalid signature"):
        verify_paillier_transcript(
            replace(transcript, inputs=(transcript.inputs[0], altered, transcript.inputs[2])),
            round_.config,
            round_.verifiers,
        )


def test_transcript_catches_a_wrong_decryption_signed_by_the_key_holder() -> None:
    round_ = Round(make_config(3, 25), random_inputs(3, 25, seed=15))
    request = round_.endorse_stage()
    honest = round_.holder.receive(request)
    round_.aggregator.receive(honest)
    round_.aggregator.close_stage()
    transcript = full_transcript(round_, "peer-002")
    lie = _resigned_lie(round_, honest, request)
    with pytest.raises(TranscriptError, match="proof") as caught:
        verify_paillier_transcript(
            replace(transcript, decryption=lie), round_.config, round_.verifiers
        )
    assert caught.value.offender == "peer-000"


def test_transcript_catches_a_missing_endorsement_and_another_round() -> None:
    round_ = finished_round(16)
    transcript = full_transcript(round_, "peer-001")
    with pytest.raises(TranscriptError, match="endorsements"):
        verify_paillier_transcript(
            replace(transcript, endorsements=transcript.endorsements[:1]),
            round_.config,
            round_.verifiers,
        )
    with pytest.raises(TranscriptError, match="round"):
        verify_paillier_transcript(transcript, make_config(3, 25, round_=1), round_.verifiers)


# ------------------------------------------------------------------ configuration


def test_config_refuses_small_keys_unless_testing() -> None:
    peers = peer_ids(3)
    with pytest.raises(ConfigError, match="tests only"):
        PaillierConfig(RoundConfig(SESSION, 0, peers, 2, 10), peers[0], 1024)
    assert PaillierConfig(RoundConfig(SESSION, 0, peers, 2, 10), peers[0]).key_bits == 2048


def test_config_refuses_impossible_threshold_and_roles() -> None:
    peers = peer_ids(3)
    with pytest.raises(ConfigError, match="endorsements"):
        PaillierConfig(RoundConfig(SESSION, 0, peers, 3, 10), peers[0])
    config = make_config(3, 10)
    signers, verifiers = testing.test_identities(config.round.peers, 0)
    with pytest.raises(ConfigError, match="both aggregator and key holder"):
        PaillierAggregator(config, verifiers, config.key_holder)
    with pytest.raises(ConfigError, match="both aggregator and key holder"):
        PaillierParticipant(
            config,
            "peer-001",
            signers["peer-001"],
            verifiers,
            np.zeros(10, dtype=np.uint32),
            DeterministicRandom(0),
            config.key_holder,
        )


def test_seeded_key_generation_is_reproducible() -> None:
    first = SeededPrimes(DeterministicRandom("k")).generate(KEY_BITS)
    second = SeededPrimes(DeterministicRandom("k")).generate(KEY_BITS)
    assert first.public_key.n == second.public_key.n
    assert first.public_key.n.bit_length() == KEY_BITS


def test_messages_validate_their_shape() -> None:
    with pytest.raises(ValueError, match="modulus"):
        KeyAnnouncement("peer-000", SESSION, 0, 1, b"")
    with pytest.raises(ValueError, match="positive"):
        EncryptedInput("peer-000", SESSION, 0, (0,), b"")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=3, max_value=40),
    m=st.integers(min_value=1, max_value=60),
    summed=st.integers(min_value=1, max_value=40),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_packed_sums_unpack_to_the_ring_sum(n: int, m: int, summed: int, seed: int) -> None:
    """Adding packed plaintexts adds every coordinate, for any roster size up to its n."""
    summed = min(summed, n)
    config = PaillierConfig(
        RoundConfig(SESSION, 0, peer_ids(n), n // 2 + 1, m),
        "peer-000",
        KEY_BITS,
        insecure_small_keys=True,
    )
    vectors = random_inputs(summed, m, seed)
    vectors[0, : m // 2] = 0xFFFFFFFF  # the worst case for carries
    plaintexts = [sum(column) for column in zip(*(pack(v, config) for v in vectors), strict=True)]
    assert all(p < 1 << (KEY_BITS - 1) for p in plaintexts)
    expected = vectors.astype(np.uint64).sum(axis=0) % (1 << 32)
    assert np.array_equal(unpack(plaintexts, config), expected.astype(np.uint32))


def test_altered_witness_fails_the_proof() -> None:
    round_ = Round(make_config(3, 10), random_inputs(3, 10, seed=17))
    request = round_.endorse_stage()
    honest = round_.holder.receive(request)
    forged = replace(honest, witness=honest.witness + 1)
    payload = forged.signed_payload(
        round_.config.digest, request.contributions, aggregate_digest(request.aggregate)
    )
    forged = replace(forged, signature=round_.signers["peer-000"].sign(payload))
    with pytest.raises(RemoteProtocolError, match="proof") as caught:
        round_.aggregator.receive(forged)
    assert caught.value.offender == "peer-000"


def test_paillier_peer_plays_both_roles_behind_one_interface() -> None:
    """The facade the round drivers use: start() then receive() for whatever arrives."""
    config = make_config(3, 12)
    inputs = random_inputs(3, 12, seed=18)
    signers, verifiers = testing.test_identities(config.round.peers, 0)
    peers = {
        u: PaillierPeer(
            config,
            u,
            signers[u],
            verifiers,
            inputs[i],
            DeterministicRandom(f"peer/{u}"),
            AGG,
            SeededPrimes(DeterministicRandom("facade")),
        )
        for i, u in enumerate(config.round.peers)
    }
    aggregator = PaillierAggregator(config, verifiers, AGG)
    for u, peer in peers.items():
        first = peer.start()
        assert (first is not None) == (u == config.key_holder)
        if first is not None:
            aggregator.receive(first)
    while aggregator.state is PaillierAggregatorState.RUNNING:
        for u, message in aggregator.close_stage().items():
            aggregator.receive(peers[u].receive(message))
        if aggregator.stage is PaillierStage.DECRYPT and not aggregator.pending():
            aggregator.close_stage()
    assert aggregator.result is not None
    assert np.array_equal(
        aggregator.result.aggregate, inputs.astype(np.uint64).sum(axis=0).astype(np.uint32)
    )
    holder = peers[config.key_holder]
    assert holder.state is KeyHolderState.DONE
    for u, peer in peers.items():
        verified = verify_paillier_transcript(
            aggregator.transcript(u), config, verifiers, own=peer.sent_input, me=u
        )
        assert np.array_equal(verified.aggregate, aggregator.result.aggregate)
    with pytest.raises(RemoteProtocolError, match="non-key-holder"):
        peers["peer-001"].receive(
            DecryptionRequest(SESSION, 0, (), (), ())  # never for a plain participant
        )
