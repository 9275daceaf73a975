"""Hypothesis properties: sums under dropouts, Shamir thresholds, quantization."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from secagg_testlib import FixedBytes, make_round, revealed_both, run_with_drops, spy_simulate

from secagg import (
    AggregatorState,
    ConfigError,
    DeterministicRandom,
    GraphKind,
    ParticipantState,
    Quantizer,
    Stage,
)
from secagg.graph import minimum_threshold
from secagg.shamir import PRIME, reconstruct, split_secret
from secagg.simulate import simulate
from secagg.testing import peer_ids

# ------------------------------------------------------------------------------ dropouts


@dataclass(frozen=True)
class Scenario:
    n: int
    length: int
    graph: GraphKind
    degree: int | None
    drops: dict[Stage, int]
    seed: int

    @property
    def threshold(self) -> int:
        hood = self.n if self.degree is None else min(self.n, self.degree + 1)
        return minimum_threshold(hood)

    def remaining(self) -> list[int]:
        left, out = self.n, []
        for stage in Stage:
            left -= self.drops.get(stage, 0)
            out.append(left)
        return out


@st.composite
def scenarios(draw: st.DrawFn, graph: GraphKind) -> Scenario:
    n = draw(st.integers(4, 12))
    degree = None
    if graph is GraphKind.SECAGG_PLUS:
        n = max(n, 6)
        degree = draw(st.sampled_from(list(range(2, n - 2, 2))))
    t = minimum_threshold(n if degree is None else degree + 1)
    drops: dict[Stage, int] = {}
    left = n
    for stage in Stage:
        # Mostly patterns around the threshold: sometimes just below it, to see the abort.
        count = draw(st.integers(0, min(left, max(0, left - t) + 1)))
        if count:
            drops[stage] = count
        left -= count
    return Scenario(n, draw(st.integers(1, 8)), graph, degree, drops, draw(st.integers(0, 2**16)))


def _run(s: Scenario) -> None:
    # A survivor that misses the prove stage is verified from its vector: never an abort.
    enough = all(r >= s.threshold for r in s.remaining()[: list(Stage).index(Stage.PROVE)])
    if not enough:
        _run_below_threshold(s)
        return
    result, reveals = spy_simulate(
        n_peers=s.n,
        vector_length=s.length,
        graph=s.graph,
        degree=s.degree,
        drops=s.drops,
        seed=s.seed,
    )
    # Never both shares of one peer, whatever happened.
    assert not revealed_both(reveals)
    if result.aggregate is not None:
        assert result.ok, (result.aborted, result.transcript_error)
        assert result.expected is not None
        assert np.array_equal(result.aggregate, result.expected)
        assert result.transcript_error is None
        assert len(result.survivors) >= s.threshold
    else:
        # Only a SecAgg+ neighbourhood can fall below t while enough peers remain overall.
        assert s.graph is GraphKind.SECAGG_PLUS
        assert result.aborted
        assert result.transcript is None
    if s.graph is GraphKind.COMPLETE or not s.drops:
        assert result.aggregate is not None


def _run_below_threshold(s: Scenario) -> None:
    """simulate() refuses such patterns up front, so drive the same objects by hand."""
    r = make_round(
        s.n, length=s.length, graph=s.graph, degree=s.degree, seed=s.seed, peers=peer_ids(s.n)
    )
    order = [str(u) for u in np.random.default_rng(s.seed).permutation(list(r.peers))]
    drop_at: dict[str, int] = {}
    for index, stage in enumerate(Stage):
        for _ in range(s.drops.get(stage, 0)):
            drop_at[order.pop()] = index
    aborted, reveals = run_with_drops(r, drop_at)
    assert aborted
    assert r.aggregator.state is AggregatorState.ABORTED
    assert r.aggregator.result is None
    assert not revealed_both(reveals)
    assert all(p.state is not ParticipantState.FAILED for p in r.participants.values())


@settings(max_examples=40, deadline=None)
@given(scenarios(GraphKind.COMPLETE))
def test_complete_graph_sum_under_any_dropout_pattern(s: Scenario) -> None:
    _run(s)


@settings(max_examples=40, deadline=None)
@given(scenarios(GraphKind.SECAGG_PLUS))
def test_secagg_plus_sum_under_any_dropout_pattern(s: Scenario) -> None:
    _run(s)


# ------------------------------------------------------------------------------ Shamir


@st.composite
def sharings(draw: st.DrawFn, min_threshold: int = 1) -> tuple[bytes, int, dict[int, int]]:
    n = draw(st.integers(max(1, min_threshold), 10))
    t = draw(st.integers(min_threshold, n))
    xs = draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=32, max_size=32))
    shares = split_secret(secret, xs, t, DeterministicRandom(draw(st.integers(0, 2**32))))
    return secret, t, shares


@settings(max_examples=60, deadline=None)
@given(sharings(), st.data())
def test_any_t_shares_reconstruct(
    sharing: tuple[bytes, int, dict[int, int]], data: st.DataObject
) -> None:
    secret, t, shares = sharing
    chosen = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, unique=True))
    assert reconstruct({x: shares[x] for x in chosen}, t, check=True) == secret


@settings(max_examples=30, deadline=None)
@given(sharings(min_threshold=2), st.data())
def test_a_wrong_share_among_more_than_t_is_detected(
    sharing: tuple[bytes, int, dict[int, int]], data: st.DataObject
) -> None:
    _, t, shares = sharing
    if len(shares) <= t:
        return
    x = data.draw(st.sampled_from(sorted(shares)))
    bad = dict(shares)
    bad[x] = (bad[x] + data.draw(st.integers(1, PRIME - 1))) % PRIME
    with pytest.raises(ValueError, match="inconsistent"):
        reconstruct(bad, t, check=True)


def _poly_mul(a: list[int], b: list[int]) -> list[int]:
    out = [0] * (len(a) + len(b) - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            out[i + j] = (out[i + j] + ai * bj) % PRIME
    return out


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the polynomial of degree < len(points) through them."""
    total = [0] * len(points)
    for j, (xj, yj) in enumerate(points):
        basis, denominator = [1], 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                basis = _poly_mul(basis, [-xm % PRIME, 1])
                denominator = denominator * (xj - xm) % PRIME
        factor = yj * pow(denominator, -1, PRIME) % PRIME
        total = [(c + factor * b) % PRIME for c, b in zip(total, basis, strict=True)]
    return total


@settings(max_examples=30, deadline=None)
@given(sharings(min_threshold=2), st.data())
def test_t_minus_1_shares_are_consistent_with_every_secret(
    sharing: tuple[bytes, int, dict[int, int]], data: st.DataObject
) -> None:
    """For any t-1 shares and any candidate secret, build the degree-(t-1) polynomial through
    (0, candidate) and the shares, and show that split_secret, given that polynomial's
    coefficients as its randomness, deals exactly those shares: they carry no information."""
    secret, t, shares = sharing
    seen = data.draw(
        st.lists(st.sampled_from(sorted(shares)), min_size=t - 1, max_size=t - 1, unique=True)
    )
    candidate = data.draw(st.binary(min_size=32, max_size=32))
    points = [(0, int.from_bytes(candidate, "big"))] + [(x, shares[x]) for x in seen]
    coefficients = _interpolate(points)
    assert len(coefficients) == t
    assert coefficients[0] == int.from_bytes(candidate, "big")
    for x in seen:
        value = sum(c * pow(x, k, PRIME) for k, c in enumerate(coefficients)) % PRIME
        assert value == shares[x]
    randomness = b"".join(c.to_bytes(48, "big") for c in coefficients[1:])
    extra = max(shares) + 1  # split_secret deals at least t shares
    dealt = split_secret(candidate, [*seen, extra], t, FixedBytes(randomness))
    assert {x: dealt[x] for x in seen} == {x: shares[x] for x in seen}
    if candidate != secret and t <= len(shares):
        # ...while t shares do pin the secret down.
        assert reconstruct(shares, t) == secret


# ------------------------------------------------------------------------------ quantization


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 50),
    bits=st.sampled_from([32, 64]),
    bound=st.floats(1e-3, 1e3),
    length=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    data=st.data(),
)
def test_dequantized_sum_is_within_n_over_scale(
    n: int, bits: int, bound: float, length: int, seed: int, data: st.DataObject
) -> None:
    quantizer = Quantizer(bound, n, bits)
    rng = np.random.default_rng(seed)
    values = data.draw(
        st.lists(
            st.lists(st.floats(-bound, bound), min_size=length, max_size=length),
            min_size=n,
            max_size=n,
        )
    )
    x = np.array(values, dtype=np.float64)
    total = np.zeros(length, dtype=quantizer.dtype)
    exact = np.zeros(length, dtype=object)
    for row in x:
        q = quantizer.quantize(row, rng)
        assert q.clipped_count == 0
        assert int(q.values.max()) <= quantizer.levels
        exact += q.values.astype(object)
        np.add(total, q.values, out=total)
    assert all(int(v) < 1 << bits for v in exact)  # the ring sum is the integer sum
    approx = quantizer.dequantize_sum(total, n)
    # Rounding moves each value by < 1 level; the float64 conversion of a 64-bit sum adds
    # a relative 2^-53 of it (at most n * 2^53 levels, so about n more levels).
    slack = 1.0 if bits == 32 else 2.0
    tolerance = slack * n / quantizer.scale + 1e-12 * n * bound
    assert np.all(np.abs(approx - x.sum(axis=0)) <= tolerance)


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000])
def test_no_wrap_at_n_peers_with_values_at_the_bound(n: int, bits: int) -> None:
    quantizer = Quantizer(2.5, n, bits)
    rng = np.random.default_rng(0)
    total = np.zeros(3, dtype=quantizer.dtype)
    for _ in range(n):
        q = quantizer.quantize(np.array([2.5, -2.5, 1e9]), rng)
        assert q.clipped_count == 1
        np.add(total, q.values, out=total)
    assert [int(v) for v in total] == [n * quantizer.levels, 0, n * quantizer.levels]
    assert n * quantizer.levels <= (1 << bits) - 1
    np.testing.assert_allclose(quantizer.dequantize_sum(total, n), [2.5 * n, -2.5 * n, 2.5 * n])


def test_stochastic_rounding_is_unbiased() -> None:
    """Many independent roundings of one value: their mean is the value (5 sigma tolerance)."""
    quantizer = Quantizer(1.0, 10)
    level = int(1.1 * float(quantizer.scale))
    value = (level + 0.3) / float(quantizer.scale) - 1.0  # 30% of the way to the next level
    draws = 200_000
    q = quantizer.quantize(np.full(draws, value), np.random.default_rng(1234))
    scaled = (value + 1.0) * float(quantizer.scale)
    p = scaled - math.floor(scaled)
    assert 0.05 < p < 0.95  # the test needs a value that really is rounded at random
    assert set(np.unique(q.values).tolist()) == {math.floor(scaled), math.floor(scaled) + 1}
    mean = float(q.values.astype(np.float64).mean())
    sigma = math.sqrt(p * (1 - p) / draws)
    assert abs(mean - scaled) <= 5 * sigma
    # The same, seen through dequantization of the sum.
    total = int(q.values.astype(np.uint64).sum())
    estimate = total / float(quantizer.scale) / draws - 1.0
    assert abs(estimate - value) <= 5 * sigma / float(quantizer.scale)


def test_clipped_fraction_is_reported() -> None:
    quantizer = Quantizer(np.array([1.0, 1.0, 2.0, 2.0]), 3)
    q = quantizer.quantize(np.array([1.5, -0.5, -2.5, 2.0]), np.random.default_rng(0))
    assert q.clipped_count == 2
    assert q.clipped_fraction == 0.5
    ok = quantizer.quantize(np.array([1.0, -1.0, 2.0, -2.0]), np.random.default_rng(0))
    assert ok.clipped_count == 0
    assert ok.clipped_fraction == 0.0


def test_quantizer_rejects_bad_parameters_and_inputs() -> None:
    for bound in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError):
            Quantizer(bound, 3)
    with pytest.raises(ConfigError):
        Quantizer(1.0, 0)
    with pytest.raises(ConfigError):
        Quantizer(1.0, 3, bits=16)
    quantizer = Quantizer(1.0, 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        quantizer.quantize(np.array([np.nan]), np.random.default_rng(0))
    with pytest.raises(ConfigError):
        quantizer.dequantize_sum(np.zeros(1, dtype=np.uint32), 4)


def test_simulate_records_abort_below_threshold() -> None:
    result = simulate(4, 2, drops={Stage.UNMASK: 2})
    assert result.aborted is not None
    assert result.aggregate is None
    assert not result.ok
