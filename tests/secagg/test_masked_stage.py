"""The participant's masked stage writes y where it is told, and the simulator times it against
its keystream floor (issue 11: the masked stage at <= 1.5x the floor)."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

import secagg.participant as participant_module
from secagg import testing
from secagg.config import RoundConfig, Stage
from secagg.crypto import DeterministicRandom, KeyPair
from secagg.errors import ConfigError, InvalidSignatureError, LocalProtocolError
from secagg.masking import mask_input
from secagg.messages import MaskedInput, SharesToYou, vector_digest, vector_hasher
from secagg.participant import Participant, ParticipantState
from secagg.prg import keystream_floor
from secagg.simulate import simulate
from secagg.testing import peer_ids


def _masking_inputs(length: int) -> tuple[RoundConfig, dict[str, KeyPair], np.ndarray, bytes]:
    peers = peer_ids(4)
    config = RoundConfig("s", 1, peers, 3, length)
    rng = DeterministicRandom("masked-stage")
    keys = {u: KeyPair.generate(rng) for u in peers}
    x = np.frombuffer(rng.token_bytes(4 * length), dtype=np.uint32).copy()
    return config, keys, x, rng.token_bytes(32)


def test_mask_input_writes_y_into_the_given_buffer() -> None:
    config, keys, x, seed = _masking_inputs(1000)
    me, publics = "peer-000", {v: keys[v].public for v in config.peers[1:]}
    fresh = mask_input(config, me, x, seed, keys[me], publics)
    out = np.full(1000, 7, dtype=np.uint32)
    hasher = vector_hasher()
    y = mask_input(config, me, x, seed, keys[me], publics, hasher=hasher, out=out)
    assert y is out
    assert np.array_equal(y, fresh)
    assert hasher.digest() == vector_digest(fresh)


def test_mask_input_refuses_to_overwrite_its_input() -> None:
    # y written over x would lose the input that a retried attempt masks again.
    config, keys, x, seed = _masking_inputs(100)
    publics = {v: keys[v].public for v in config.peers[1:]}
    with pytest.raises(ConfigError, match="overlaps the input"):
        mask_input(config, "peer-000", x, seed, keys["peer-000"], publics, out=x)
    with pytest.raises(ConfigError, match="shape"):
        mask_input(
            config, "peer-000", x, seed, keys["peer-000"], publics, out=np.empty(99, np.uint32)
        )


def test_participant_refuses_a_buffer_aliasing_its_input_or_read_only() -> None:
    config, _, x, _ = _masking_inputs(100)
    signers, verifiers = testing.test_identities(config.peers, 0)

    def make(buffer: np.ndarray) -> Participant:
        rng = DeterministicRandom("p")
        return Participant(
            config, "peer-000", signers["peer-000"], verifiers, x, rng, masked_buffer=buffer
        )

    with pytest.raises(LocalProtocolError, match="apart from x"):
        make(x[:])
    frozen = np.zeros(100, np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(LocalProtocolError, match="writable"):
        make(frozen)
    with pytest.raises(LocalProtocolError, match="length 100"):
        make(np.zeros(99, np.uint32))


def test_warm_buffers_change_no_outcome() -> None:
    # The pre-touched y buffers of the simulator are a memory placement only: the same round,
    # bit for bit, with fresh arrays.
    warm = simulate(6, 257, seed=3, drops={Stage.MASKED: 1})
    cold = simulate(6, 257, seed=3, drops={Stage.MASKED: 1}, warm_buffers=False)
    assert warm.ok
    assert cold.ok
    assert warm.aggregate is not None
    assert cold.aggregate is not None
    assert np.array_equal(warm.aggregate, cold.aggregate)
    assert warm.transcript is not None
    assert cold.transcript is not None
    assert [m.header() for m in warm.transcript.masked_inputs] == [
        m.header() for m in cold.transcript.masked_inputs
    ]


def test_simulate_reports_the_masked_stage_against_its_keystream_floor() -> None:
    ticks = iter(range(10**6))
    result = simulate(5, 64, seed=1, clock=lambda: float(next(ticks)))
    masked = result.timings_s[Stage.MASKED.value]
    # With a clock that ticks once per reading, every timing is exactly one tick: the floor is
    # read around its own work only, once per timed participant.
    assert masked["keystream_floor"] == 1.0
    assert masked["floor_ratio"] == masked["participant_median"] / masked["keystream_floor"]
    real = simulate(5, 20_000, seed=1, clock=time.thread_time).timings_s[Stage.MASKED.value]
    assert real["keystream_floor"] > 0
    # The stage expands the same keystreams and more: it is never below its floor.
    assert real["floor_ratio"] > 1.0


def test_keystream_floor_refuses_a_negative_count() -> None:
    with pytest.raises(ConfigError, match="negative"):
        keystream_floor(-1, 10)
    keystream_floor(0, 10)()  # no masks: nothing to do, and no error


def test_masked_stage_expands_one_mask_per_partner_and_one_self_mask(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # n = 10 on the complete graph: 9 pairwise masks and the self mask, each expanded once
    # over m words, and y hashed once: no extra PRG pass, no second read of y for its digest.
    from secagg_testlib import make_round  # tests/secagg is on the path (conftest)

    import secagg.prg as prg

    m = 5000
    r = make_round(10, length=m)
    shares = r.advance(2)  # what the aggregator sends at the masked stage: SharesToYou
    expanded: list[int] = []
    keystream = prg._keystream

    class Counting:
        def __init__(self, seed: bytes) -> None:
            self._inner = keystream(seed)
            self._index = len(expanded)
            expanded.append(0)

        def update_into(self, data: bytes, out: bytearray) -> int:
            expanded[self._index] += len(data)
            return self._inner.update_into(data, out)

    hashed: list[int] = []

    class CountingHasher:
        def __init__(self) -> None:
            self._inner = vector_hasher()

        def update(self, data: memoryview) -> None:
            hashed.append(data.nbytes)
            self._inner.update(data)

        def digest(self) -> bytes:
            return self._inner.digest()

    monkeypatch.setattr(prg, "_keystream", Counting)
    monkeypatch.setattr(participant_module, "vector_hasher", CountingHasher)
    me = r.peers[0]
    reply = r.participants[me].receive(shares[me])
    assert isinstance(reply, MaskedInput)
    assert len(reply.masked_with) == 9
    assert expanded == [4 * m] * 10
    assert sum(hashed) == 4 * m
    assert reply.header().vector_sha256 == vector_digest(reply.vector)


@pytest.mark.parametrize("change", ["ciphertext", "signature", "another-peers-entry"])
def test_own_shares_must_come_back_byte_for_byte(change: str) -> None:
    # The participant compares its own share ciphertext and signature with what it sent
    # instead of verifying its own signature: any change is refused, naming the aggregator.
    from secagg_testlib import AGGREGATOR, make_round

    r = make_round(4, length=8)
    shares = r.advance(2)
    me = r.peers[0]
    message = shares[me]
    assert isinstance(message, SharesToYou)
    pairs, signatures = list(message.ciphertexts), list(message.signatures)
    mine = next(i for i, (u, _) in enumerate(pairs) if u == me)
    other = next(i for i, (u, _) in enumerate(pairs) if u != me)
    if change == "ciphertext":
        ciphertext = pairs[mine][1]
        pairs[mine] = (me, ciphertext[:-1] + bytes([ciphertext[-1] ^ 1]))
    elif change == "signature":  # a valid signature of mine, over something else
        signatures[mine] = r.signers[me].sign(b"something else")
    else:
        pairs[mine] = (me, pairs[other][1])
        signatures[mine] = signatures[other]
    tampered = replace(message, ciphertexts=tuple(pairs), signatures=tuple(signatures))
    participant = r.participants[me]
    with pytest.raises(InvalidSignatureError, match="other than I sent") as raised:
        participant.receive(tampered)
    assert raised.value.offender == AGGREGATOR
    assert participant.state is ParticipantState.FAILED
