"""Federated DP statistics: three hospitals' stores, local DP answers, a ring sum, conclude."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peer.config import PeerConfig, Policy
from peer.data import (
    BUNDLED_DATASET_NAME,
    PatientRecord,
    PatientStore,
    breast_cancer_feature_names,
    breast_cancer_records,
    split_dataset,
    write_hospital_stores,
)
from peer.ledger import Ledger, PrivacyCharge, PrivacyKind
from peer.payloads import LocalContribution, RoundResult
from peer.payloads.statistics import (
    CountQuery,
    MeanQuery,
    PatientTable,
    StatisticsBudgetError,
    StatisticsDataError,
    StatisticsPayload,
    StatisticsSpec,
    StatisticsSpecError,
    local_answers,
    record_statistics_result,
    statistics_epsilon_needed,
    statistics_payload,
)
from peer.session import SessionProposal, check_policy
from secagg.simulate import simulate

PEERS = ("hospital-a", "hospital-b", "hospital-c")
RADIUS = "mean radius"
AREA = "mean area"
EDGES = [6.0, 10.0, 12.0, 14.0, 17.0, 20.0, 30.0]


def spec_payload(epsilon: float, **overrides: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "kind": "statistics",
        "epsilon": epsilon,
        "max_records": 1000,
        "queries": [
            {"name": "diagnoses", "type": "count", "categories": ["benign", "malignant"]},
            {"name": "radius", "type": "histogram", "feature": RADIUS, "edges": EDGES},
            {"name": "area", "type": "mean", "feature": AREA, "bounds": [0, 3000], "weight": 2},
        ],
    }
    payload.update(overrides)
    return payload


@dataclass
class Hospitals:
    names: list[str]
    parts: list[list[PatientRecord]]
    stores: list[PatientStore]

    def union(self) -> list[PatientRecord]:
        return [r for part in self.parts for r in part]

    def column(self, feature: str, part: Sequence[PatientRecord] | None = None) -> np.ndarray:
        index = self.names.index(feature)
        return np.array([r.features[index] for r in (part or self.union())])


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hospitals]:
    records = breast_cancer_records(np.random.default_rng(0))
    # Label-skewed and of unequal sizes, so a mean of local means is visibly wrong.
    parts = split_dataset(records, 3, mode="dirichlet", alpha=0.6, rng=np.random.default_rng(3))
    names = breast_cancer_feature_names()
    stores = write_hospital_stores(
        parts,
        tmp_path_factory.mktemp("stores"),
        feature_names=names,
        dataset_name=BUNDLED_DATASET_NAME,
    )
    yield Hospitals(names, parts, stores)
    for store in stores:
        store.dispose()


def make_payloads(
    hospitals: Hospitals,
    payload: Mapping[str, Any],
    *,
    seed: int = 0,
    budget: float = math.inf,
    spent: float = 0.0,
    bits: int = 32,
) -> list[StatisticsPayload]:
    spec = StatisticsSpec.from_payload(payload)
    return [
        StatisticsPayload(
            spec,
            store,
            peer_id=peer,
            budget=budget,
            spent=lambda: spent,
            n_peers=len(PEERS),
            bits=bits,
            rng=np.random.default_rng(seed * 100 + i),
            random_state=seed * 100 + i,
        )
        for i, (peer, store) in enumerate(zip(PEERS, hospitals.stores, strict=True))
    ]


def ring_sum(contributions: Sequence[LocalContribution]) -> np.ndarray:
    # The modular sum secure aggregation computes (uint32 addition wraps).
    total = np.zeros_like(contributions[0].vector)
    for contribution in contributions:
        total = total + contribution.vector
    return total


def run_round(
    payloads: Sequence[StatisticsPayload], round_: int = 1
) -> tuple[list[LocalContribution], RoundResult]:
    contributions = [p.prepare(round_) for p in payloads]
    result = payloads[0].conclude(round_, ring_sum(contributions), PEERS)
    return contributions, result


def stats_of(result: RoundResult) -> Mapping[str, Any]:
    statistics = result.metrics["statistics"]
    assert isinstance(statistics, Mapping)
    return statistics


# --------------------------------------------------------------------------- accuracy


def test_large_epsilon_gives_the_answers_of_the_pooled_data(hospitals: Hospitals) -> None:
    payloads = make_payloads(hospitals, spec_payload(1e6))
    contributions, result = run_round(payloads)
    union = hospitals.union()
    stats = stats_of(result)

    counts = stats["diagnoses"]["counts"]
    for diagnosis in ("benign", "malignant"):
        true = sum(r.diagnosis == diagnosis for r in union)
        assert abs(counts[diagnosis] - true) <= 1, (diagnosis, counts, true)

    expected_hist, _ = np.histogram(hospitals.column(RADIUS), bins=EDGES)
    np.testing.assert_allclose(stats["radius"]["counts"], expected_hist, atol=1)
    assert stats["radius"]["edges"] == EDGES

    area = stats["area"]
    pooled = float(np.mean(hospitals.column(AREA)))
    assert area["count"] == pytest.approx(len(union), abs=1)
    assert area["mean"] == pytest.approx(pooled, rel=1e-3)
    assert area["sum"] == pytest.approx(float(np.sum(hospitals.column(AREA))), rel=1e-3)

    for c in contributions:
        assert c.epsilon == pytest.approx(1e6)
        assert c.clipped_fraction == 0.0
    # The model bytes are the float64 result vector in the spec's layout.
    vector = np.frombuffer(result.model, dtype="<f8")
    assert vector.shape == (payloads[0].vector_length(1),)
    assert vector[0] == counts["benign"]


def test_global_mean_is_the_pooled_mean_not_the_mean_of_local_means(
    hospitals: Hospitals,
) -> None:
    payloads = make_payloads(hospitals, spec_payload(1e6))
    _, result = run_round(payloads)
    pooled = float(np.mean(hospitals.column(AREA)))
    mean_of_means = float(np.mean([hospitals.column(AREA, p).mean() for p in hospitals.parts]))
    # The split is skewed enough that the two differ; the federated answer is the pooled one.
    assert abs(mean_of_means - pooled) > 20
    assert stats_of(result)["area"]["mean"] == pytest.approx(pooled, abs=1.0)


def test_secure_aggregation_of_the_contributions(hospitals: Hospitals) -> None:
    payloads = make_payloads(hospitals, spec_payload(1e6), seed=4)
    contributions = [p.prepare(1) for p in payloads]
    inputs = np.stack([c.vector for c in contributions])
    simulated = simulate(
        len(PEERS), payloads[0].vector_length(1), inputs=inputs, seed=1, threshold=2
    )
    assert simulated.ok
    assert simulated.aggregate is not None
    np.testing.assert_array_equal(simulated.aggregate, ring_sum(contributions))
    result = payloads[1].conclude(1, simulated.aggregate, PEERS)
    true = sum(r.diagnosis == "malignant" for r in hospitals.union())
    assert abs(stats_of(result)["diagnoses"]["counts"]["malignant"] - true) <= 1


def test_dropped_hospital_is_left_out_of_the_sum(hospitals: Hospitals) -> None:
    payloads = make_payloads(hospitals, spec_payload(1e6))
    contributions = [p.prepare(1) for p in payloads]
    result = payloads[0].conclude(1, ring_sum(contributions[:2]), PEERS[:2])
    kept = hospitals.parts[0] + hospitals.parts[1]
    stats = stats_of(result)
    assert abs(stats["area"]["count"] - len(kept)) <= 1
    assert stats["area"]["mean"] == pytest.approx(
        float(np.mean(hospitals.column(AREA, kept))), rel=1e-3
    )


# --------------------------------------------------------------------------- noise


def table(n_benign: int, n_malignant: int, area: float) -> PatientTable:
    diagnoses = ["benign"] * n_benign + ["malignant"] * n_malignant
    return PatientTable(diagnoses, {AREA: np.full(len(diagnoses), area)})


def test_small_epsilon_noise_has_the_geometric_scale_and_no_bias() -> None:
    epsilon = 0.5  # count query gets 0.25, the mean query 0.25 (sum 0.125, count 0.125)
    spec = StatisticsSpec.from_payload(
        {
            "kind": "statistics",
            "epsilon": epsilon,
            "queries": [
                {"name": "d", "type": "count", "categories": ["benign", "malignant"]},
                {"name": "a", "type": "mean", "feature": AREA, "bounds": [0, 1000]},
            ],
        }
    )
    data = table(40, 3, 500.0)  # 3: close to zero, where truncated noise would be biased
    random_state = np.random.RandomState(7)
    trials = 3000
    answers = np.array(
        [
            local_answers(spec, data, _accountant(epsilon), random_state) - [40, 3, 500 * 43, 43]
            for _ in range(trials)
        ]
    )

    def geometric_std(eps: float, sensitivity: int) -> float:
        # Two-sided geometric with P(k) ~ exp(-eps |k| / sensitivity), in integer units.
        p = math.exp(-eps / sensitivity)
        return math.sqrt(2 * p) / (1 - p)

    expected = [
        geometric_std(0.25, 1),
        geometric_std(0.25, 1),
        geometric_std(0.125, 1 << 20) * 1000 / (1 << 20),  # fixed-point units to area
        geometric_std(0.125, 1),
    ]
    np.testing.assert_allclose(answers.std(axis=0), expected, rtol=0.1)
    # Unbiased (not truncated at zero): the mean noise is within 4 standard errors of 0.
    assert np.all(np.abs(answers.mean(axis=0)) < 4 * np.array(expected) / math.sqrt(trials))


def _accountant(epsilon: float) -> Any:
    from diffprivlib.accountant import BudgetAccountant

    return BudgetAccountant(epsilon=epsilon * (1 + 1e-9), delta=0)


def test_accountant_refuses_to_overspend() -> None:
    from diffprivlib.utils import BudgetError

    spec = StatisticsSpec.from_payload(
        {
            "kind": "statistics",
            "epsilon": 1.0,
            "queries": [{"name": "d", "type": "count", "categories": ["benign"]}],
        }
    )
    with pytest.raises(BudgetError):
        local_answers(spec, table(1, 1, 1.0), _accountant(0.5), None)


def test_summed_noise_of_three_hospitals(hospitals: Hospitals) -> None:
    # Three hospitals each add their own noise: the global count's spread is sqrt(3) times
    # one hospital's, measured over independent runs of the whole pipeline.
    epsilon = 1.0
    payload = {
        "kind": "statistics",
        "epsilon": epsilon,
        "max_records": 1000,
        "queries": [{"name": "d", "type": "count", "categories": ["malignant"]}],
    }
    true = sum(r.diagnosis == "malignant" for r in hospitals.union())
    errors = []
    for seed in range(150):
        _, result = run_round(make_payloads(hospitals, payload, seed=seed))
        errors.append(stats_of(result)["d"]["counts"]["malignant"] - true)
    p = math.exp(-epsilon)
    expected = math.sqrt(3) * math.sqrt(2 * p) / (1 - p)
    assert np.std(errors) == pytest.approx(expected, rel=0.25)
    assert all(float(e).is_integer() for e in errors)  # counts are exact integers after rounding


# --------------------------------------------------------------------------- determinism


def test_conclude_is_deterministic_across_calls_and_peers(hospitals: Hospitals) -> None:
    payloads = make_payloads(hospitals, spec_payload(0.7))
    contributions = [p.prepare(1) for p in payloads]
    aggregate = ring_sum(contributions)
    results = [p.conclude(1, aggregate, PEERS) for p in payloads]
    results.append(payloads[0].conclude(1, aggregate.copy(), PEERS))
    assert all(r.model == results[0].model for r in results)
    assert all(r.metrics == results[0].metrics for r in results)


def test_same_seeds_reproduce_and_different_seeds_differ(hospitals: Hospitals) -> None:
    first = [c.vector for c in run_round(make_payloads(hospitals, spec_payload(0.7), seed=1))[0]]
    again = [c.vector for c in run_round(make_payloads(hospitals, spec_payload(0.7), seed=1))[0]]
    other = [c.vector for c in run_round(make_payloads(hospitals, spec_payload(0.7), seed=2))[0]]
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_retried_round_reuses_its_noise(hospitals: Hospitals) -> None:
    calls = []

    def spent() -> float:
        calls.append(1)
        return 0.0

    spec = StatisticsSpec.from_payload(spec_payload(0.5))
    payload = StatisticsPayload(
        spec, hospitals.stores[0], peer_id="a", budget=1.0, spent=spent, n_peers=3
    )
    first = payload.prepare(1)
    assert payload.prepare(1) is first
    assert len(calls) == 1
    assert not np.array_equal(payload.prepare(2).vector, first.vector)


def test_clipping_is_reported(hospitals: Hospitals) -> None:
    payloads = make_payloads(hospitals, spec_payload(1e6, max_records=5))
    contribution = payloads[0].prepare(1)
    assert contribution.clipped_fraction > 0


# --------------------------------------------------------------------------- budget


def test_prepare_refuses_beyond_the_budget(hospitals: Hospitals) -> None:
    payload = make_payloads(hospitals, spec_payload(0.5), budget=1.0, spent=0.8)[0]
    with pytest.raises(StatisticsBudgetError) as error:
        payload.prepare(1)
    message = str(error.value)
    assert "hospital-a" in message
    assert "needs epsilon 0.5" in message
    assert "0.8 of the budget 1 is already spent" in message


def test_prepare_accepts_exactly_the_remaining_budget(hospitals: Hospitals) -> None:
    payload = make_payloads(hospitals, spec_payload(0.2), budget=1.0, spent=0.8)[0]
    assert payload.prepare(1).epsilon == pytest.approx(0.2)


def peer_config(tmp_path: Path, store: PatientStore, max_epsilon: float) -> PeerConfig:
    return PeerConfig(
        path=tmp_path / "hospital-a.toml",
        peer_id="hospital-a",
        listen="127.0.0.1:0",
        cert=tmp_path / "cert.pem",
        key=tmp_path / "key.pem",
        ca=tmp_path / "ca.pem",
        roster=tmp_path / "roster.json",
        crl=tmp_path / "crl.pem",
        data_url=str(store.engine.url),
        ledger_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        policy=Policy(max_epsilon=max_epsilon),
    )


def proposal(session_id: str, payload: Mapping[str, Any], rounds: int = 1) -> SessionProposal:
    if payload.get("kind") == "statistics":
        payload = StatisticsSpec.from_payload(payload).to_payload()  # adds the length
    return SessionProposal(session_id, PEERS, rounds=rounds, threshold=3, payload=payload)


def charge(ledger: Ledger, session_id: str, epsilon: float, kind: PrivacyKind) -> None:
    ledger.record_proposal(
        session_id,
        proposal(session_id, spec_payload(epsilon)).document(),
        proposer="op",
        participants=list(PEERS),
        threshold=2,
        rounds_planned=1,
    )
    ledger.record_statistics(
        f"{session_id}/q",
        session_id,
        1,
        query={},
        result={},
        epsilon=epsilon,
        privacy=[PrivacyCharge("hospital-a", kind, epsilon, 0.0)],
    )


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        ledger.create()
        yield ledger


def test_proposal_refused_beyond_the_budget(
    tmp_path: Path, hospitals: Hospitals, ledger: Ledger
) -> None:
    config = peer_config(tmp_path, hospitals.stores[0], max_epsilon=2.0)
    charge(ledger, "training-1", 1.5, PrivacyKind.TRAINING)
    wanted = proposal("stats-1", spec_payload(0.3), rounds=2)
    assert statistics_epsilon_needed(wanted) == pytest.approx(0.6)
    with pytest.raises(StatisticsBudgetError, match=r"needs epsilon 0\.6.*1\.5 of the budget 2"):
        statistics_payload(wanted, config, ledger)
    reason = check_policy(
        wanted,
        "op",
        False,  # an operator, which the site allows to propose
        "hospital-a",
        replace(config.policy, allowed_operators=("op",)),
        epsilon_spent=ledger.privacy_spent("hospital-a").epsilon,
        epsilon_needed=statistics_epsilon_needed(wanted),
    )
    assert reason is not None
    assert "privacy budget" in reason
    # Within the budget, the factory builds a working payload.
    ok = proposal("stats-2", spec_payload(0.25), rounds=2)
    payload = statistics_payload(ok, config, ledger, rng=np.random.default_rng(0), random_state=1)
    assert payload.epsilon_needed() == pytest.approx(0.5)
    assert payload.prepare(1).epsilon == pytest.approx(0.25)


def test_resumed_session_is_not_refused_its_own_spending(
    tmp_path: Path, hospitals: Hospitals, ledger: Ledger
) -> None:
    config = peer_config(tmp_path, hospitals.stores[0], max_epsilon=1.0)
    charge(ledger, "stats-1", 0.6, PrivacyKind.STATISTICS)
    # Restarted after round 1 (0.6 of its 0.6 charged): the factory still accepts it ...
    payload = statistics_payload(proposal("stats-1", spec_payload(0.6)), config, ledger)
    # ... but one more round would exceed the budget (0.6 spent + 0.6 > 1.0).
    with pytest.raises(StatisticsBudgetError, match="statistics round 2"):
        payload.prepare(2)
    # Another session of the same cost is refused up front.
    with pytest.raises(StatisticsBudgetError, match="statistics session stats-2"):
        statistics_payload(proposal("stats-2", spec_payload(0.6)), config, ledger)
    assert statistics_epsilon_needed(proposal("v", {"kind": "vector", "length": 3})) == 0.0


def test_unknown_feature_is_refused_naming_the_query(
    tmp_path: Path, hospitals: Hospitals, ledger: Ledger
) -> None:
    config = peer_config(tmp_path, hospitals.stores[0], max_epsilon=5.0)
    bad = spec_payload(
        1.0, queries=[{"name": "bp", "type": "mean", "feature": "blood pressure", "bounds": [0, 1]}]
    )
    with pytest.raises(StatisticsDataError, match=r"query 'bp'.*'blood pressure'"):
        statistics_payload(proposal("s", bad), config, ledger)


# --------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"epsilon": 0}, "'epsilon' must be finite and positive"),
        ({"epsilon": "1"}, "'epsilon' must be a number"),
        ({"max_records": 0}, "'max_records' must be a positive integer"),
        ({"split": "validation"}, "'split' must be one of"),
        ({"queries": []}, "'queries' must be a non-empty list"),
        ({"model": "mlp"}, "'model' must be 'statistics'"),
        ({"bins": 3}, "unknown keys ['bins']"),
        ({"length": 4}, "'length' is 4 but the queries make a vector of 10"),
        ({"queries": [{"name": "x", "type": "median"}]}, "query 0 ('x'): 'type' must be one of"),
        ({"queries": [{"type": "count"}]}, "query 0: 'name' must be"),
        (
            {"queries": [{"name": "d", "type": "count", "categories": []}]},
            "query 0 ('d'): 'categories' must be a non-empty list",
        ),
        (
            {"queries": [{"name": "d", "type": "count", "categories": ["a", "a"]}]},
            "query 0 ('d'): 'categories' lists a diagnosis twice",
        ),
        (
            {"queries": [{"name": "h", "type": "histogram", "feature": RADIUS, "edges": [3, 1]}]},
            "query 0 ('h'): 'edges' must be at least 2 strictly increasing",
        ),
        (
            {"queries": [{"name": "h", "type": "histogram", "feature": RADIUS, "bins": [1, 2]}]},
            "query 0 ('h'): unknown keys ['bins'] for a histogram query",
        ),
        (
            {"queries": [{"name": "m", "type": "mean", "feature": AREA, "bounds": [5, 5]}]},
            "query 0 ('m'): 'bounds' must be [lower, upper] with lower < upper",
        ),
        (
            {"queries": [{"name": "m", "type": "mean", "feature": AREA, "bounds": [0, "x"]}]},
            "query 0 ('m'): 'bounds' must hold finite numbers",
        ),
        (
            {"queries": [{"name": "m", "type": "mean", "bounds": [0, 1]}]},
            "query 0 ('m'): 'feature' must be a feature name",
        ),
        (
            {
                "queries": [
                    {"name": "d", "type": "count", "categories": ["a"]},
                    {"name": "d", "type": "count", "categories": ["b"], "weight": -1},
                ]
            },
            "query 1 ('d'): 'weight' must be finite and positive",
        ),
        (
            {
                "queries": [
                    {"name": "d", "type": "count", "categories": ["a"]},
                    {"name": "d", "type": "count", "categories": ["b"]},
                ]
            },
            "query 1 ('d'): the name is used twice",
        ),
    ],
)
def test_malformed_specs_are_refused_clearly(change: dict[str, Any], message: str) -> None:
    with pytest.raises(StatisticsSpecError) as error:
        StatisticsSpec.from_payload({**spec_payload(1.0), **change})
    assert message in str(error.value)


def test_spec_round_trips_and_splits_epsilon_by_weight() -> None:
    spec = StatisticsSpec.from_payload(spec_payload(2.0))
    assert StatisticsSpec.from_payload(spec.to_payload()) == spec
    assert spec.query_epsilons() == pytest.approx((0.5, 0.5, 1.0))
    assert spec.vector_length == 2 + len(EDGES) - 1 + 2
    assert isinstance(spec.queries[0], CountQuery)
    assert isinstance(spec.queries[2], MeanQuery)
    assert statistics_epsilon_needed(proposal("s", spec.to_payload(), rounds=3)) == 6.0
    # A proposal carrying the spec survives the canonical document round trip.
    document = proposal("s", spec.to_payload()).document()
    assert StatisticsSpec.from_payload(SessionProposal.from_document(document).payload) == spec


# --------------------------------------------------------------------------- ledger


def test_results_are_recorded_once(hospitals: Hospitals, ledger: Ledger) -> None:
    payload = spec_payload(1e6)
    _, result = run_round(make_payloads(hospitals, payload))
    session = proposal("stats-1", payload)
    ledger.record_proposal(
        "stats-1",
        session.document(),
        proposer="op",
        participants=list(PEERS),
        threshold=2,
        rounds_planned=1,
    )
    stored = record_statistics_result(ledger, "stats-1", 1, session, result)
    assert [s.query_id for s in stored] == [
        "stats-1/1/diagnoses",
        "stats-1/1/radius",
        "stats-1/1/area",
    ]
    assert record_statistics_result(ledger, "stats-1", 1, session, result) == []
    # The metrics of the stored agreed record work too (catch-up, resumed sessions).
    assert record_statistics_result(ledger, "stats-1", 1, session, result.metrics) == []
    saved = {s.query_id: s for s in ledger.statistics_results("stats-1")}
    assert saved["stats-1/1/area"].result == stats_of(result)["area"]
    assert saved["stats-1/1/area"].epsilon == pytest.approx(5e5)
    # Recording results charges no privacy (that is the agreed record's job).
    assert ledger.privacy_spent("hospital-a").epsilon == 0.0
