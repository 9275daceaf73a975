"""A statistics session's queries: what is asked, of which feature, within which bounds.

The ``statistics`` payload (:mod:`peer.payloads.statistics`) answers a :class:`StatisticsSpec`
parsed from the proposal; everything here is public, checked before any patient data is read.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import numpy as np
import numpy.typing as npt

from ..data import Split
from ..ledger import JsonValue
from ..session import ProposalError

__all__ = [
    "FIXED_POINT_LEVELS",
    "STATISTICS_KIND",
    "CountQuery",
    "HistogramQuery",
    "MeanQuery",
    "Query",
    "StatisticsSpec",
    "StatisticsSpecError",
]

STATISTICS_KIND: Final = "statistics"
FIXED_POINT_LEVELS: Final = 1 << 20  # resolution of sums: (upper - lower) / 2**20
DEFAULT_MAX_RECORDS: Final = 100_000
# Quantization headroom for the noise: P(|geometric noise| > ln(1e9)/epsilon) ~ 1e-9.
_NOISE_TAIL: Final = math.log(1e9)
# Float slack when comparing epsilon sums (a split E*w/W summed back may differ by an ulp).
_EPSILON_SLACK: Final = 1e-9
_SPLIT_OF: Final[Mapping[str, Split | None]] = {"all": None, "train": "train", "test": "test"}
_SPLITS: Final = tuple(_SPLIT_OF)


class StatisticsSpecError(ProposalError):
    """A statistics query specification is malformed (the query at fault is named)."""


# --------------------------------------------------------------------------- the queries


@dataclass(frozen=True, slots=True)
class CountQuery:
    """Number of patients per diagnosis, for the listed categories in that order.

    Patients whose diagnosis is not listed are not counted (list every diagnosis of
    interest; the categories are in the query so that every hospital lays out the same
    vector, whatever diagnoses it happens to hold).
    """

    name: str
    categories: tuple[str, ...]
    weight: float = 1.0
    type: ClassVar[str] = "count"

    @property
    def width(self) -> int:
        return len(self.categories)

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "type": self.type,
            "categories": list(self.categories),
            "weight": self.weight,
        }


@dataclass(frozen=True, slots=True)
class HistogramQuery:
    """Histogram of one feature over the given bin edges (``numpy.histogram`` semantics:
    bins are half-open except the last; values outside the edges are not counted)."""

    name: str
    feature: str
    edges: tuple[float, ...]
    weight: float = 1.0
    type: ClassVar[str] = "histogram"

    @property
    def width(self) -> int:
        return len(self.edges) - 1

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "type": self.type,
            "feature": self.feature,
            "edges": list(self.edges),
            "weight": self.weight,
        }


@dataclass(frozen=True, slots=True)
class MeanQuery:
    """Mean of one feature, values clipped to ``[lower, upper]`` (a DP sum and a DP count)."""

    name: str
    feature: str
    lower: float
    upper: float
    weight: float = 1.0
    type: ClassVar[str] = "mean"

    @property
    def width(self) -> int:
        return 2  # shifted sum, count

    def to_json(self) -> dict[str, JsonValue]:
        return {
            "name": self.name,
            "type": self.type,
            "feature": self.feature,
            "bounds": [self.lower, self.upper],
            "weight": self.weight,
        }


Query = CountQuery | HistogramQuery | MeanQuery

_QUERY_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "count": frozenset({"name", "type", "weight", "categories"}),
    "histogram": frozenset({"name", "type", "weight", "feature", "edges"}),
    "mean": frozenset({"name", "type", "weight", "feature", "bounds"}),
}
_SPEC_KEYS: Final = frozenset(
    {"kind", "epsilon", "max_records", "split", "queries", "model", "length"}
)


@dataclass(frozen=True)
class StatisticsSpec:
    """The parsed ``payload`` of a statistics session proposal (see the module docstring).

    Attributes:
        queries: the queries, in vector order.
        epsilon: what one hospital spends per round, over all queries.
        max_records: the declared largest number of patients of one hospital (sets the
            quantization bounds; larger hospitals are clipped, and report it).
        split: which records are counted: ``"all"``, ``"train"`` or ``"test"``.
    """

    queries: tuple[Query, ...]
    epsilon: float
    max_records: int = DEFAULT_MAX_RECORDS
    split: str = "all"

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> StatisticsSpec:
        """Parse and validate a proposal payload.

        Raises:
            StatisticsSpecError: naming the key, or the query (index and name), at fault.
        """
        if not isinstance(payload, Mapping):
            raise StatisticsSpecError("statistics payload must be a JSON object")
        if payload.get("kind") != STATISTICS_KIND:
            raise StatisticsSpecError(
                f"payload kind must be {STATISTICS_KIND!r}, not {payload.get('kind')!r}"
            )
        unknown = sorted(set(payload) - _SPEC_KEYS)
        if unknown:
            raise StatisticsSpecError(
                f"statistics payload has unknown keys {unknown} (allowed: {sorted(_SPEC_KEYS)})"
            )
        if payload.get("model", STATISTICS_KIND) != STATISTICS_KIND:
            raise StatisticsSpecError(
                f"statistics payload: 'model' must be {STATISTICS_KIND!r} if given, "
                f"not {payload.get('model')!r}"
            )
        epsilon = _positive_number(payload.get("epsilon"), "statistics payload: 'epsilon'")
        max_records = payload.get("max_records", DEFAULT_MAX_RECORDS)
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise StatisticsSpecError(
                f"statistics payload: 'max_records' must be a positive integer, not {max_records!r}"
            )
        split = payload.get("split", "all")
        if split not in _SPLITS:
            raise StatisticsSpecError(
                f"statistics payload: 'split' must be one of {list(_SPLITS)}, not {split!r}"
            )
        raw_queries = payload.get("queries")
        if not isinstance(raw_queries, list | tuple) or not raw_queries:
            raise StatisticsSpecError("statistics payload: 'queries' must be a non-empty list")
        queries: list[Query] = []
        names: set[str] = set()
        for index, raw in enumerate(raw_queries):
            query = _parse_query(index, raw)
            if query.name in names:
                raise StatisticsSpecError(
                    f"statistics query {index} ({query.name!r}): the name is used twice"
                )
            names.add(query.name)
            queries.append(query)
        spec = cls(tuple(queries), epsilon, max_records, str(split))
        length = payload.get("length", spec.vector_length)
        if length != spec.vector_length:
            raise StatisticsSpecError(
                f"statistics payload: 'length' is {length!r} but the queries make a vector of "
                f"{spec.vector_length}"
            )
        return spec

    def to_payload(self) -> dict[str, JsonValue]:
        """The proposal payload (JSON-able) that :meth:`from_payload` parses back.

        It carries the vector ``length`` too: :class:`~peer.session.SessionProposal` sizes
        its round configuration from ``payload["length"]``.
        """
        return {
            "kind": STATISTICS_KIND,
            "length": self.vector_length,
            "epsilon": self.epsilon,
            "max_records": self.max_records,
            "split": self.split,
            "queries": [q.to_json() for q in self.queries],
        }

    @property
    def vector_length(self) -> int:
        return sum(q.width for q in self.queries)

    def query_epsilons(self) -> tuple[float, ...]:
        """Each query's share of :attr:`epsilon` (proportional to its weight)."""
        total = math.fsum(q.weight for q in self.queries)
        return tuple(self.epsilon * q.weight / total for q in self.queries)

    def privacy_events(self) -> tuple[dict[str, JsonValue], ...]:
        """The mechanisms one round releases (for the ledger's accountant): a count or a
        histogram is one geometric mechanism of its share; a mean is two of half its share.
        """
        from ..training.accounting import pure_event

        events: list[dict[str, JsonValue]] = []
        for query, eps in zip(self.queries, self.query_epsilons(), strict=True):
            if isinstance(query, MeanQuery):
                events.append(dict(pure_event(eps / 2, count=2)))
            else:
                events.append(dict(pure_event(eps)))
        return tuple(events)

    def features(self) -> tuple[str, ...]:
        """The feature names the queries need (sorted, distinct)."""
        return tuple(
            sorted({q.feature for q in self.queries if isinstance(q, HistogramQuery | MeanQuery)})
        )

    def bounds(self) -> npt.NDArray[np.float64]:
        """The quantization bound of every coordinate (see the module docstring)."""
        parts: list[npt.NDArray[np.float64]] = []
        for query, eps in zip(self.queries, self.query_epsilons(), strict=True):
            if isinstance(query, MeanQuery):
                half = eps / 2
                span = query.upper - query.lower
                parts.append(
                    np.array([span * self._headroom(half), self._headroom(half)], dtype=np.float64)
                )
            else:
                parts.append(np.full(query.width, self._headroom(eps), dtype=np.float64))
        return np.concatenate(parts)

    def _headroom(self, epsilon: float) -> float:
        return float(self.max_records + math.ceil(_NOISE_TAIL / epsilon) + 1)

    def integer_mask(self) -> npt.NDArray[np.bool_]:
        """Which coordinates hold integers (counts), as opposed to fixed-point sums."""
        parts = [
            np.array([False, True]) if isinstance(q, MeanQuery) else np.ones(q.width, dtype=bool)
            for q in self.queries
        ]
        return np.concatenate(parts)


def _positive_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise StatisticsSpecError(f"{what} must be a number, not {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise StatisticsSpecError(f"{what} must be finite and positive, not {value!r}")
    return float(value)


def _finite_numbers(value: object, what: str) -> tuple[float, ...]:
    if not isinstance(value, list | tuple):
        raise StatisticsSpecError(f"{what} must be a list of numbers, not {value!r}")
    numbers: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise StatisticsSpecError(f"{what} must hold finite numbers, not {item!r}")
        numbers.append(float(item))
    return tuple(numbers)


def _feature(raw: Mapping[str, Any], where: str) -> str:
    feature = raw.get("feature")
    if not isinstance(feature, str) or not feature:
        raise StatisticsSpecError(f"{where}: 'feature' must be a feature name, not {feature!r}")
    return feature


def _parse_query(index: int, raw: object) -> Query:
    if not isinstance(raw, Mapping):
        raise StatisticsSpecError(f"statistics query {index} must be a JSON object, not {raw!r}")
    name = raw.get("name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise StatisticsSpecError(
            f"statistics query {index}: 'name' must be a non-empty string of at most 128 "
            f"characters, not {name!r}"
        )
    where = f"statistics query {index} ({name!r})"
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in _QUERY_KEYS:
        raise StatisticsSpecError(
            f"{where}: 'type' must be one of {sorted(_QUERY_KEYS)}, not {kind!r}"
        )
    unknown = sorted(set(raw) - _QUERY_KEYS[kind])
    if unknown:
        raise StatisticsSpecError(
            f"{where}: unknown keys {unknown} for a {kind} query "
            f"(allowed: {sorted(_QUERY_KEYS[kind])})"
        )
    weight = _positive_number(raw.get("weight", 1.0), f"{where}: 'weight'")
    if kind == "count":
        categories = raw.get("categories")
        if (
            not isinstance(categories, list | tuple)
            or not categories
            or not all(isinstance(c, str) and c for c in categories)
        ):
            raise StatisticsSpecError(
                f"{where}: 'categories' must be a non-empty list of diagnosis names, "
                f"not {categories!r}"
            )
        if len(set(categories)) != len(categories):
            raise StatisticsSpecError(f"{where}: 'categories' lists a diagnosis twice")
        return CountQuery(name, tuple(categories), weight)
    if kind == "histogram":
        feature = _feature(raw, where)
        edges = _finite_numbers(raw.get("edges"), f"{where}: 'edges'")
        if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
            raise StatisticsSpecError(
                f"{where}: 'edges' must be at least 2 strictly increasing numbers, "
                f"not {list(edges)}"
            )
        return HistogramQuery(name, feature, edges, weight)
    feature = _feature(raw, where)
    bounds = _finite_numbers(raw.get("bounds"), f"{where}: 'bounds'")
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise StatisticsSpecError(
            f"{where}: 'bounds' must be [lower, upper] with lower < upper, not {list(bounds)}"
        )
    return MeanQuery(name, feature, bounds[0], bounds[1], weight)
