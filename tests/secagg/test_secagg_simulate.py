"""The simulator's malicious aggregator: every attack is detected and nothing is revealed."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_testlib import revealed_both, spy_simulate

from secagg import GraphKind
from secagg.simulate import Attack

SETTINGS = [
    (GraphKind.COMPLETE, None, 5),
    (GraphKind.COMPLETE, None, 6),
    (GraphKind.COMPLETE, None, 7),
    (GraphKind.SECAGG_PLUS, 4, 10),
]


@pytest.mark.parametrize("attack", list(Attack), ids=[a.value for a in Attack])
@pytest.mark.parametrize(
    ("graph", "degree", "n"), SETTINGS, ids=[f"{g.value}-{n}" for g, _, n in SETTINGS]
)
def test_every_attack_is_detected(
    attack: Attack, graph: GraphKind, degree: int | None, n: int
) -> None:
    result, reveals = spy_simulate(
        n_peers=n, vector_length=3, graph=graph, degree=degree, attack=attack, seed=n
    )
    assert result.ok
    assert result.refusals or result.transcript_error is not None
    assert not revealed_both(reveals)
    if attack is Attack.WRONG_SUM:
        assert result.transcript_error is not None
        assert "aggregator" in result.transcript_error
    else:
        assert all("aggregator" in reason for reason in result.refusals.values())


def test_honest_simulation_is_correct_and_reveals_only_one_share_per_peer() -> None:
    result, reveals = spy_simulate(n_peers=8, vector_length=6, seed=1)
    assert result.ok
    assert result.aggregate is not None
    assert result.expected is not None
    assert np.array_equal(result.aggregate, result.expected)
    assert len(reveals) == 8
    assert not revealed_both(reveals)
