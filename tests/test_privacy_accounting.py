"""Privacy accounting: known answers, calibration round trips, budget enforcement."""

from __future__ import annotations

import pytest

from peer.training import PrivacyBudget, PrivacyBudgetError, calibrate_noise, epsilon

# Abadi et al.'s MNIST setting: 60,000 examples, lot size 256, sigma 1.1, 60 epochs.
Q, SIGMA, STEPS, DELTA = 256 / 60000, 1.1, 14040, 1e-5


def test_known_answer_rdp() -> None:
    # dp_accounting 0.6.0 gives 2.5944; TensorFlow Privacy's published figure is ~2.6.
    assert epsilon(Q, SIGMA, STEPS, DELTA, "rdp") == pytest.approx(2.59, abs=0.05)


def test_known_answer_pld_is_tighter_than_rdp() -> None:
    pld = epsilon(Q, SIGMA, STEPS, DELTA, "pld")
    assert pld == pytest.approx(2.38, abs=0.05)  # 2.3796 with dp_accounting 0.6.0
    assert pld < epsilon(Q, SIGMA, STEPS, DELTA, "rdp")


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    assert epsilon(0.01, 1.0, 100, DELTA) < epsilon(0.01, 1.0, 1000, DELTA)
    assert epsilon(0.01, 2.0, 1000, DELTA) < epsilon(0.01, 1.0, 1000, DELTA)


@pytest.mark.parametrize(("accountant", "target"), [("rdp", 1.0), ("rdp", 8.0), ("pld", 3.0)])
def test_calibration_round_trip(accountant: str, target: float) -> None:
    q, steps = 0.1, 200
    sigma = calibrate_noise(q, steps, DELTA, target, accountant)  # type: ignore[arg-type]
    achieved = epsilon(q, sigma, steps, DELTA, accountant)  # type: ignore[arg-type]
    assert achieved <= target
    assert achieved == pytest.approx(target, rel=0.01)
    # Slightly less noise would overshoot: the calibration is the smallest sigma.
    assert epsilon(q, sigma * 0.98, steps, DELTA, accountant) > target  # type: ignore[arg-type]


def test_budget_refuses_a_round_that_would_exceed() -> None:
    q, sigma, per_round = 0.1, 2.0, 50
    budget = PrivacyBudget(
        epsilon_limit=epsilon(q, sigma, 2 * per_round, DELTA) + 1e-6, delta=DELTA
    )
    assert budget.spent() == 0.0
    assert not budget.would_exceed(q, sigma, per_round)
    first = budget.charge(q, sigma, per_round)
    second = budget.charge(q, sigma, per_round)
    assert 0 < first < second <= budget.epsilon_limit
    assert budget.spent() == pytest.approx(second)
    assert budget.would_exceed(q, sigma, 1)
    with pytest.raises(PrivacyBudgetError, match="would spend epsilon"):
        budget.charge(q, sigma, per_round)
    assert len(budget.spends) == 2  # the refused round recorded nothing
    assert budget.spent("rdp") >= budget.spent("pld") - 0.01
