"""Minimal plain FedAvg (aggregation "plain", issue 11): the benchmark's honest baseline.

It reveals every input to the aggregator and takes the sum on trust, so no peer may join
such a session unless its own policy allows cleartext; its reply travels in the real wire
format; and a peer still refuses a reply that is not a sum over this round including its
own input, naming the aggregator.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from peer.codec import decode, encode
from peer.config import Policy
from peer.session import SessionProposal, check_policy
from secagg import Stage
from secagg.cleartext import CleartextAggregator, CleartextParticipant, PlainSum, check_plain_sum
from secagg.config import RoundConfig
from secagg.errors import RemoteProtocolError
from secagg.testing import test_identities as identities

PEERS = ("hospital-a", "hospital-b", "hospital-c")


def _proposal(aggregation: str) -> SessionProposal:
    return SessionProposal(
        "plain-1",
        PEERS,
        rounds=1,
        threshold=2,
        payload={"kind": "vector", "length": 4},
        aggregation=aggregation,
    )


def test_plain_sessions_need_the_cleartext_policy() -> None:
    policy = Policy(allowed_operators=("op",), allow_exact_payloads=True)
    reason = check_policy(_proposal("plain"), "op", False, "hospital-a", policy)
    assert reason is not None
    assert "plain aggregation reveals every input" in reason
    allowed = replace(policy, allow_cleartext=True)
    assert check_policy(_proposal("plain"), "op", False, "hospital-a", allowed) is None


def _round() -> tuple[RoundConfig, PlainSum]:
    config = RoundConfig("s", 1, PEERS, 2, 4)
    signers, verifiers = identities(PEERS, 0)
    aggregator = CleartextAggregator(config, verifiers, "hospital-a")
    vectors = {u: np.arange(4, dtype=np.uint32) * (i + 1) for i, u in enumerate(PEERS)}
    for u in PEERS:
        aggregator.receive(CleartextParticipant(config, u, signers[u], vectors[u]).start())
    assert aggregator.close_stage() == {}
    assert aggregator.stage is Stage.MASKED
    return config, aggregator.plain_sum()


def test_plain_sum_is_the_sum_and_survives_the_wire() -> None:
    config, plain = _round()
    np.testing.assert_array_equal(plain.aggregate, np.arange(4, dtype=np.uint32) * 6)
    back = decode(*encode(plain))
    assert isinstance(back, PlainSum)
    assert (back.session_id, back.round, back.aggregator, back.survivors) == (
        "s",
        1,
        "hospital-a",
        PEERS,
    )
    np.testing.assert_array_equal(check_plain_sum(back, config, "hospital-b"), plain.aggregate)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"round": 2}, "another session or round"),
        ({"survivors": ("hospital-a", "hospital-c")}, "leaves out the input of hospital-b"),
        ({"survivors": (*PEERS, "mallory")}, "not in the roster"),
        ({"aggregate": np.zeros(5, dtype=np.uint32)}, "wrong shape"),
    ],
)
def test_a_malformed_plain_sum_is_refused_naming_the_aggregator(
    change: dict[str, object], reason: str
) -> None:
    config, plain = _round()
    with pytest.raises(RemoteProtocolError, match=reason) as refused:
        check_plain_sum(replace(plain, **change), config, "hospital-b")  # type: ignore[arg-type]
    assert refused.value.offender == "hospital-a"
