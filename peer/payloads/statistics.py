"""Federated differentially private statistics: cohort counts, histograms and means.

A statistics session asks every hospital the same questions about its patients, e.g. "how
many patients per diagnosis", "histogram of tumour radius", "mean tumour area". Each hospital
answers *locally* with differential privacy (``diffprivlib`` mechanisms under a
``BudgetAccountant``), lays its answers out in one vector, and the vectors are summed by
secure aggregation, so nobody (not even the aggregator) sees one hospital's answer.

Theory of operation
-------------------

**Privacy unit.** One patient record, added or removed (unbounded DP). Every mechanism is
calibrated to that: a count changes by at most 1, a histogram (or a count per diagnosis)
changes by 1 in at most one cell, a sum of values clipped to ``[lower, upper]`` and shifted
to ``[0, upper - lower]`` changes by at most ``upper - lower``. Hospitals hold disjoint
patients, so the released sums are as private as each hospital's answer (parallel
composition across hospitals); within one hospital, the queries of a session compose
sequentially.

**Mechanisms.** Two-sided geometric noise (``diffprivlib.mechanisms.Geometric``) on integers
only: counts, histogram cells, and sums computed in fixed point (each clipped, shifted value
is rounded to ``2**20`` levels of ``upper - lower``). Integer mechanisms avoid the
floating-point weaknesses of a textbook Laplace sampler, and the noise is *not truncated*
at zero, so it is unbiased and stays unbiased when summed over hospitals (a truncated
mechanism would add a positive bias per hospital). Consequently a noisy count may be
negative; that is the honest estimate, not a bug.

**Epsilon split.** The session's ``epsilon`` is what one hospital spends per round. It is
split across the queries in proportion to their ``weight`` (default 1: an equal split). A
count or histogram query spends its share once (each patient falls in one cell: parallel
composition across the cells). A mean query spends half of its share on the sum and half on
the count.

**Means.** The global mean is ``lower + (sum of the hospitals' shifted sums) / (sum of their
counts)``. Averaging the hospitals' local means would be wrong twice: it weights a hospital
of 20 patients like one of 2,000 (the mean of means is not the mean of the union unless all
hospitals are the same size), and a small hospital's local DP mean is dominated by noise
(the noise of ``sum / count`` grows as the count shrinks), which the average would carry at
full weight. Summing sums and counts weights every patient equally and divides the total
noise by the total count. The result is clamped to ``[lower, upper]`` (post-processing: the
true mean of clipped values lies there); it is ``None`` when the noisy total count is not
positive.

**Quantization.** Secure aggregation sums ring words, so the float answers are quantized
(:class:`secagg.quantize.Quantizer`). The per-coordinate bound follows from the query alone,
so every hospital uses the same one: ``sensitivity * (max_records + margin + 1)`` where
``max_records`` is the declared largest hospital and ``margin = ceil(ln(1e9) / epsilon)``
covers the geometric noise except with probability about 1e-9. A hospital whose answer is
clipped anyway (it holds more than ``max_records`` patients) reports it in
``LocalContribution.clipped_fraction`` and in its log. Integer-valued coordinates (counts)
are rounded back to integers in :meth:`StatisticsPayload.conclude` when the quantization
error of the sum is provably below one half, which makes them exact.

**Budget.** The budget is the institution's ``policy.max_epsilon``, shared with training.
What was spent is read from the ledger (:meth:`peer.ledger.Ledger.privacy_spent`). A
session that would exceed it is refused at proposal time (:func:`statistics_payload` checks,
and :meth:`StatisticsPayload.epsilon_needed` / :func:`statistics_epsilon_needed` feed the
node's policy check) and each round is checked again before any data
is read (:meth:`StatisticsPayload.prepare`).

The query specification travels in the session proposal's payload (``length``, the vector
length, is optional here but :class:`~peer.session.SessionProposal` needs it; use
:meth:`StatisticsSpec.to_payload`, which fills it in)::

    {"kind": "statistics", "epsilon": 1.0, "max_records": 10000, "split": "all", "length": 10,
     "queries": [
        {"name": "diagnoses", "type": "count", "categories": ["benign", "malignant"]},
        {"name": "radius", "type": "histogram", "feature": "mean radius",
         "edges": [5, 10, 15, 20, 30]},
        {"name": "area", "type": "mean", "feature": "mean area", "bounds": [0, 3000],
         "weight": 2}]}
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from diffprivlib.accountant import BudgetAccountant
from diffprivlib.mechanisms import Geometric
from sqlalchemy.exc import SQLAlchemyError

from secagg.quantize import Quantizer
from secagg.ring import WordArray

from ..config import PeerConfig
from ..data import PatientStore
from ..ledger import JsonValue, Ledger, PrivacyKind, RecordRejected, StatisticsResult
from ..privacy import PrivacyBudgetError
from ..session import SessionProposal
from .base import LocalContribution, RoundResult
from .statistics_spec import (
    _EPSILON_SLACK,
    _SPLIT_OF,
    FIXED_POINT_LEVELS,
    STATISTICS_KIND,
    CountQuery,
    HistogramQuery,
    MeanQuery,
    Query,
    StatisticsSpec,
    StatisticsSpecError,
)

__all__ = [
    "FIXED_POINT_LEVELS",
    "STATISTICS_KIND",
    "CountQuery",
    "HistogramQuery",
    "MeanQuery",
    "PatientTable",
    "Query",
    "StatisticsBudgetError",
    "StatisticsDataError",
    "StatisticsPayload",
    "StatisticsSpec",
    "StatisticsSpecError",
    "check_budget",
    "local_answers",
    "record_statistics_result",
    "statistics_epsilon_needed",
    "statistics_payload",
]

logger = logging.getLogger("peer.statistics")

# Answering would exceed this institution's privacy budget: the one budget error.
StatisticsBudgetError = PrivacyBudgetError


class StatisticsDataError(ValueError):
    """This hospital's patient data cannot answer the query (missing feature, unreadable)."""


# --------------------------------------------------------------------------- budget


def statistics_epsilon_needed(proposal: SessionProposal) -> float:
    """The epsilon a statistics session costs each participant (0 for other payload kinds).

    Each round asks the queries again with fresh noise, so the cost is ``epsilon * rounds``.
    Meant for the node's policy check (``check_policy(..., epsilon_needed=...)``).

    Raises:
        StatisticsSpecError: the statistics payload is malformed.
    """
    if proposal.payload_kind != STATISTICS_KIND:
        return 0.0
    return StatisticsSpec.from_payload(proposal.payload).epsilon * proposal.rounds


def check_budget(peer_id: str, budget: float, spent: float, requested: float, what: str) -> None:
    """Raise :class:`StatisticsBudgetError` if ``spent + requested`` exceeds ``budget``."""
    if spent + requested > budget * (1 + _EPSILON_SLACK) + 1e-12:
        raise StatisticsBudgetError(
            f"privacy budget of {peer_id}: {what} needs epsilon {requested:.6g}, but "
            f"{spent:.6g} of the budget {budget:.6g} is already spent "
            f"({max(0.0, budget - spent):.6g} left)"
        )


# --------------------------------------------------------------------------- local answers


@dataclass(frozen=True)
class PatientTable:
    """What the queries read from a hospital: diagnoses and named feature columns."""

    diagnoses: Sequence[str]
    columns: Mapping[str, npt.NDArray[np.float64]]

    @classmethod
    def from_store(cls, store: PatientStore, spec: StatisticsSpec) -> PatientTable:
        """Load the records of ``spec.split`` and the columns the queries need.

        Raises:
            StatisticsDataError: the store cannot be read or lacks a feature (named).
        """
        try:
            names = store.feature_names()
            records = store.records(_SPLIT_OF[spec.split])
        except SQLAlchemyError as error:
            raise StatisticsDataError(
                f"cannot read patient data from {store.url}: {error}"
            ) from None
        _check_features(spec, names, store.url)
        index = {name: i for i, name in enumerate(names)}
        if records:
            matrix = np.stack([r.features for r in records])
        else:
            matrix = np.zeros((0, len(names)), dtype=np.float64)
        columns = {f: matrix[:, index[f]].astype(np.float64) for f in spec.features()}
        return cls([r.diagnosis for r in records], columns)

    def __len__(self) -> int:
        return len(self.diagnoses)


def _check_features(spec: StatisticsSpec, names: Sequence[str], where: str) -> None:
    known = set(names)
    for query in spec.queries:
        if isinstance(query, HistogramQuery | MeanQuery) and query.feature not in known:
            shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
            raise StatisticsDataError(
                f"statistics query {query.name!r}: feature {query.feature!r} is not in the "
                f"patient data of {where} (features: {shown or 'none, the store is empty'})"
            )


def _geometric(
    values: Iterable[int],
    epsilon: float,
    sensitivity: int,
    random_state: np.random.RandomState | None,
) -> list[int]:
    mechanism = Geometric(epsilon=epsilon, sensitivity=sensitivity, random_state=random_state)
    # Very large epsilons (tests asking for exact answers) overflow exp() inside the
    # sampler; the result is still the exact value, so the warning is noise.
    with np.errstate(over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return [int(mechanism.randomise(int(v))) for v in values]


def local_answers(
    spec: StatisticsSpec,
    table: PatientTable,
    accountant: BudgetAccountant,
    random_state: np.random.RandomState | None,
) -> npt.NDArray[np.float64]:
    """This hospital's DP answers to every query, in the vector layout of ``spec``.

    Every spend goes through ``accountant`` (which raises ``BudgetError`` past its
    ceiling). ``random_state=None`` makes diffprivlib draw its noise from
    ``secrets.SystemRandom``; a ``RandomState`` is only for reproducible tests.
    """
    out: list[float] = []
    diagnoses = np.asarray(table.diagnoses, dtype=object)
    for query, eps in zip(spec.queries, spec.query_epsilons(), strict=True):
        if isinstance(query, CountQuery):
            accountant.check(eps, 0.0)
            true = [int(np.count_nonzero(diagnoses == c)) for c in query.categories]
            # Each patient has one diagnosis: one cell changes, parallel composition.
            out.extend(float(v) for v in _geometric(true, eps, 1, random_state))
            accountant.spend(eps, 0.0)
        elif isinstance(query, HistogramQuery):
            accountant.check(eps, 0.0)
            hist, _ = np.histogram(table.columns[query.feature], bins=np.asarray(query.edges))
            out.extend(float(v) for v in _geometric(hist, eps, 1, random_state))
            accountant.spend(eps, 0.0)
        else:
            half = eps / 2
            span = query.upper - query.lower
            values = np.clip(table.columns[query.feature], query.lower, query.upper)
            units = np.rint((values - query.lower) / span * FIXED_POINT_LEVELS).astype(np.int64)
            accountant.check(half, 0.0)
            (noisy_units,) = _geometric([int(units.sum())], half, FIXED_POINT_LEVELS, random_state)
            accountant.spend(half, 0.0)
            accountant.check(half, 0.0)
            (noisy_count,) = _geometric([len(table)], half, 1, random_state)
            accountant.spend(half, 0.0)
            out.extend((noisy_units * span / FIXED_POINT_LEVELS, float(noisy_count)))
    return np.asarray(out, dtype=np.float64)


# --------------------------------------------------------------------------- the payload


class StatisticsPayload:
    """A peer's :class:`~peer.payloads.base.Payload` for a statistics session.

    Args:
        spec: the queries.
        store: this hospital's patient records.
        peer_id: this peer (named in budget errors and logs).
        budget: this institution's total epsilon (``policy.max_epsilon``).
        spent: returns the epsilon already spent (training and statistics), read from the
            ledger when called.
        n_peers: participants of the session (sets the quantizer's headroom).
        bits: ring size of the session.
        rounds: rounds of the session (for :meth:`epsilon_needed`).
        rng: generator for the quantizer's stochastic rounding (not secret).
        random_state: DP noise source; ``None`` (production) makes diffprivlib use
            ``secrets.SystemRandom``; an integer or ``RandomState`` makes tests reproducible.
    """

    def __init__(
        self,
        spec: StatisticsSpec,
        store: PatientStore,
        *,
        peer_id: str,
        budget: float,
        spent: Callable[[], float],
        n_peers: int,
        bits: int = 32,
        rounds: int = 1,
        rng: np.random.Generator | None = None,
        random_state: int | np.random.RandomState | None = None,
    ) -> None:
        self.spec = spec
        self.store = store
        self.peer_id = peer_id
        self.budget = budget
        self._spent = spent
        self.rounds = rounds
        self.quantizer = Quantizer(spec.bounds(), n_peers, bits)
        self._rng = rng if rng is not None else np.random.default_rng()
        # One RandomState for all mechanisms: seeding each mechanism with the same integer
        # would give every query the same noise.
        self._random_state = (
            np.random.RandomState(random_state) if isinstance(random_state, int) else random_state
        )
        self._integer = spec.integer_mask()
        self._prepared: dict[int, LocalContribution] = {}

    def finish(self, ledger: Ledger, proposal: SessionProposal) -> None:
        """Store each agreed round's query answers in the ledger's statistics table."""
        for stored in ledger.agreed_records(proposal.session_id):
            record_statistics_result(
                ledger, proposal.session_id, stored.record.round, proposal, stored.record.metrics
            )

    def vector_length(self, round_: int = 1) -> int:
        """Words per contribution (the same every round)."""
        return self.spec.vector_length

    def epsilon_needed(self) -> float:
        """Epsilon this hospital spends over the whole session (for the policy check)."""
        return self.spec.epsilon * self.rounds

    def prepare(self, round_: int) -> LocalContribution:
        """Answer the queries with DP noise and quantize the answers.

        A retry of the same round (its aggregator died) gets the *same* contribution:
        fresh noise would let whoever saw both attempts average the noise away. The round
        driver charges the release before it leaves (``Ledger.charge_release``), once per
        distinct value, so the retry is not charged again: it releases nothing new.

        Raises:
            StatisticsBudgetError: this round would exceed the budget (nothing is read).
            StatisticsDataError: the patient data cannot answer the queries.
        """
        cached = self._prepared.get(round_)
        if cached is not None:
            return cached
        spent = self._spent()
        check_budget(
            self.peer_id, self.budget, spent, self.spec.epsilon, f"statistics round {round_}"
        )
        table = PatientTable.from_store(self.store, self.spec)
        if len(table) > self.spec.max_records:
            logger.warning(
                "peer=%s holds %d records, more than the query's max_records %d: its counts "
                "may be clipped",
                self.peer_id,
                len(table),
                self.spec.max_records,
            )
        accountant = BudgetAccountant(epsilon=self.spec.epsilon * (1 + _EPSILON_SLACK), delta=0)
        answers = local_answers(self.spec, table, accountant, self._random_state)
        quantized = self.quantizer.quantize(answers, self._rng)
        if quantized.clipped_count:
            logger.warning(
                "peer=%s statistics round %d: %d of %d answers clipped to the quantization "
                "bounds (raise max_records)",
                self.peer_id,
                round_,
                quantized.clipped_count,
                answers.size,
            )
        spent_now, _ = accountant.total()
        # The accountant's float sum of the shares may differ from epsilon by an ulp; the
        # public claim is the round's epsilon itself (what the proposal and budget name).
        if not math.isclose(spent_now, self.spec.epsilon, rel_tol=_EPSILON_SLACK):
            raise RuntimeError(
                f"statistics round {round_} spent epsilon {spent_now}, not {self.spec.epsilon}"
            )
        contribution = LocalContribution(
            quantized.values,
            epsilon=self.spec.epsilon,
            delta=0.0,
            clipped_fraction=quantized.clipped_fraction,
            privacy_kind=PrivacyKind.STATISTICS,
            events=self.spec.privacy_events(),
        )
        self._prepared[round_] = contribution
        return contribution

    def conclude(
        self, round_: int, aggregate: WordArray, survivors: tuple[str, ...]
    ) -> RoundResult:
        """The global answers from the verified ring sum of ``len(survivors)`` vectors.

        Returns:
            ``model``: the float64 little-endian result vector (layout of the spec);
            ``metrics``: ``{"statistics": {query name: result}}``.
        """
        if aggregate.shape != (self.vector_length(),):
            raise ValueError(
                f"statistics aggregate has shape {aggregate.shape}, "
                f"expected ({self.vector_length()},)"
            )
        n = len(survivors)
        total = self.quantizer.dequantize_sum(aggregate, n)
        # Each summand is off by less than one quantization step, so for integers the sum
        # is exact after rounding whenever n steps stay below one half.
        exact = self._integer & (n / self.quantizer.scale < 0.5)
        total = np.where(exact, np.rint(total), total)
        return RoundResult(
            model=total.astype("<f8").tobytes(),
            metrics={"statistics": self.results(total)},
        )

    def results(self, total: npt.NDArray[np.float64]) -> dict[str, JsonValue]:
        """The per-query results of a global result vector (JSON-able)."""
        results: dict[str, JsonValue] = {}
        offset = 0
        for query, eps in zip(self.spec.queries, self.spec.query_epsilons(), strict=True):
            part = [float(v) for v in total[offset : offset + query.width]]
            offset += query.width
            result: dict[str, JsonValue] = {"type": query.type, "epsilon": eps}
            if isinstance(query, CountQuery):
                result["counts"] = dict(zip(query.categories, part, strict=True))
            elif isinstance(query, HistogramQuery):
                result.update(feature=query.feature, edges=list(query.edges), counts=part)
            else:
                shifted, count = part
                mean = (
                    min(query.upper, max(query.lower, query.lower + shifted / count))
                    if count > 0
                    else None
                )
                result.update(
                    feature=query.feature,
                    bounds=[query.lower, query.upper],
                    mean=mean,
                    sum=shifted + query.lower * count,
                    count=count,
                )
            results[query.name] = result
        return results


# --------------------------------------------------------------------------- node glue


def statistics_payload(
    proposal: SessionProposal,
    config: PeerConfig,
    ledger: Ledger,
    *,
    rng: np.random.Generator | None = None,
    random_state: int | np.random.RandomState | None = None,
) -> StatisticsPayload:
    """The payload factory for ``kind == "statistics"`` (for the node's dispatch).

    Checks, before anything runs: the spec is well formed, this hospital's data has the
    features asked for, and the whole session fits the remaining budget. The budget check
    leaves out what this very session already spent, so a peer resuming the session after
    a restart is not refused its own earlier rounds.

    Args:
        proposal: the session.
        config: this peer (``peer_id``, ``data_url``, ``policy.max_epsilon``).
        ledger: this peer's ledger (what was spent; read again before each round).
        rng: quantization rounding (default: a fresh generator).
        random_state: DP noise; keep ``None`` in production (``secrets.SystemRandom``).

    Raises:
        StatisticsSpecError: malformed spec.
        StatisticsBudgetError: the session would exceed ``config.policy.max_epsilon``.
        StatisticsDataError: the patient data lacks a feature or cannot be read.
    """
    spec = StatisticsSpec.from_payload(proposal.payload)
    budget = config.policy.max_epsilon
    spent_elsewhere = (
        ledger.privacy_spent(config.peer_id).epsilon
        - ledger.privacy_spent(config.peer_id, proposal.session_id).epsilon
    )
    check_budget(
        config.peer_id,
        budget,
        spent_elsewhere,
        spec.epsilon * proposal.rounds,
        f"statistics session {proposal.session_id} ({proposal.rounds} round(s) of epsilon "
        f"{spec.epsilon:.6g})",
    )
    store = PatientStore(config.data_url)
    try:
        names = store.feature_names()
    except SQLAlchemyError as error:
        raise StatisticsDataError(f"cannot read patient data from {store.url}: {error}") from None
    _check_features(spec, names, store.url)
    return StatisticsPayload(
        spec,
        store,
        peer_id=config.peer_id,
        budget=budget,
        spent=lambda: ledger.privacy_spent(config.peer_id).epsilon,
        n_peers=len(proposal.participants),
        bits=proposal.bits,
        rounds=proposal.rounds,
        rng=rng,
        random_state=random_state,
    )


def record_statistics_result(
    ledger: Ledger,
    session_id: str,
    round_: int,
    proposal: SessionProposal,
    result: RoundResult | Mapping[str, Any],
) -> list[StatisticsResult]:
    """Store each query's agreed result in the ledger's statistics table (idempotent).

    Call it after the round's agreed record is stored. It records no privacy charge: the
    charge belongs in the same transaction as the agreed record (``append_agreed``), with
    ``PrivacyKind.STATISTICS``. Query ids are ``<session>/<round>/<query name>``; ids already
    stored (a resumed session, a caught-up round) are skipped.

    Args:
        result: the round's :class:`~peer.payloads.base.RoundResult`, or the metrics of its
            stored agreed record (``stored.record.metrics``), which carry the same answers.

    Returns:
        the newly stored results.
    """
    spec = StatisticsSpec.from_payload(proposal.payload)
    metrics = result.metrics if isinstance(result, RoundResult) else result
    answers = metrics.get("statistics")
    if not isinstance(answers, Mapping):
        raise ValueError(f"session {session_id} round {round_}: result has no statistics")
    stored = {r.query_id for r in ledger.statistics_results(session_id)}
    new: list[StatisticsResult] = []
    for query, eps in zip(spec.queries, spec.query_epsilons(), strict=True):
        query_id = f"{session_id}/{round_}/{query.name}"
        if query_id in stored:
            continue
        if query.name not in answers:
            raise ValueError(
                f"session {session_id} round {round_}: no result for query {query.name!r}"
            )
        try:
            new.append(
                ledger.record_statistics(
                    query_id,
                    session_id,
                    round_,
                    query=query.to_json(),
                    result=answers[query.name],
                    epsilon=eps,
                )
            )
        except RecordRejected:
            continue  # stored concurrently since we looked
    return new
