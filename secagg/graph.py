"""Neighbour graphs: complete (SecAgg, Bonawitz et al. 2017) and random Harary (SecAgg+).

In SecAgg every peer masks with and secret-shares to every other peer: per-peer cost is
O(n·m). SecAgg+ (Bell et al., CCS 2020) replaces the complete graph with a random k-regular
graph, k = O(log n): a Harary graph H(k, n) (each peer linked to the k/2 nearest on each side
of a ring) over a random permutation of the roster. The permutation is derived from a public
seed (session id and round), so every peer computes the same graph without a message.

Each peer's *neighbourhood* is its neighbours plus itself: it Shamir-shares its secrets
t-of-|neighbourhood| to exactly these peers, and its pairwise masks are with its neighbours.

Choosing k and t (see :func:`recommend_parameters`). Let d be the fraction of peers that may
drop out and c the fraction that may be corrupted (colluding with the aggregator). For a
neighbourhood of size h = k + 1, modelled as h independent draws:

* privacy: the corrupted members must not reach t, P[Binomial(h, c) >= t] <= 2^-sigma;
* liveness: the surviving members must reach t, P[Binomial(h, 1 - d) < t] <= 2^-sigma;
* and always t > h / 2, so no two disjoint groups of t peers exist: the aggregator can never
  collect the self-mask shares and the mask-key shares of one peer from two different groups.

The smallest even k meeting these grows as O(log n) for fixed d, c and sigma, which is why the
SecAgg+ per-peer cost curve is nearly flat in n. For the complete graph h = n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from .crypto import DeterministicRandom, canonical
from .errors import ConfigError

__all__ = [
    "GraphKind",
    "NeighbourGraph",
    "minimum_threshold",
    "recommend_parameters",
    "validate_threshold",
]


class GraphKind(StrEnum):
    COMPLETE = "complete"
    SECAGG_PLUS = "secagg+"


def minimum_threshold(neighbourhood_size: int) -> int:
    """The smallest safe threshold for a neighbourhood: a strict majority."""
    return neighbourhood_size // 2 + 1


def validate_threshold(threshold: int, neighbourhood_size: int) -> None:
    """Raise ConfigError unless ``threshold`` is a strict majority of the neighbourhood."""
    low = minimum_threshold(neighbourhood_size)
    if not low <= threshold <= neighbourhood_size:
        raise ConfigError(
            f"threshold {threshold} must be between {low} (a strict majority) and "
            f"{neighbourhood_size} (the neighbourhood size)"
        )


@dataclass(frozen=True, slots=True)
class NeighbourGraph:
    """Who masks with and shares to whom. ``peers`` is the roster in its canonical order."""

    kind: GraphKind
    peers: tuple[str, ...]
    neighbours: Mapping[str, frozenset[str]]

    @classmethod
    def complete(cls, peers: Sequence[str]) -> NeighbourGraph:
        roster = _check_roster(peers)
        everyone = frozenset(roster)
        return cls(GraphKind.COMPLETE, roster, {u: everyone - {u} for u in roster})

    @classmethod
    def harary(cls, peers: Sequence[str], degree: int, seed: bytes) -> NeighbourGraph:
        """A random Harary graph of even ``degree`` over ``peers``, permuted by ``seed``."""
        roster = _check_roster(peers)
        n = len(roster)
        if degree >= n - 1:
            return cls(GraphKind.SECAGG_PLUS, roster, cls.complete(roster).neighbours)
        if degree < 2 or degree % 2:
            raise ConfigError(f"SecAgg+ degree must be even and at least 2, not {degree}")
        order = _permutation(n, seed)
        ring = [roster[i] for i in order]
        half = degree // 2
        neighbours: dict[str, set[str]] = {u: set() for u in roster}
        for i, u in enumerate(ring):
            for step in range(1, half + 1):
                v = ring[(i + step) % n]
                neighbours[u].add(v)
                neighbours[v].add(u)
        return cls(
            GraphKind.SECAGG_PLUS, roster, {u: frozenset(vs) for u, vs in neighbours.items()}
        )

    @classmethod
    def build(
        cls,
        kind: GraphKind,
        peers: Sequence[str],
        degree: int | None,
        session_id: str,
        round_: int,
        beacon: bytes = b"",
    ) -> NeighbourGraph:
        """The graph of one round; SecAgg+ graphs are re-drawn every round.

        ``beacon`` (the session's commit-reveal randomness) makes the seed one that nobody
        chose; without it the seed is (session id, round), which a proposer controls.
        """
        if kind is GraphKind.COMPLETE:
            return cls.complete(peers)
        if degree is None:
            raise ConfigError("a SecAgg+ graph needs a degree")
        if beacon:
            # The beacon already binds the whole proposal; the session id adds nothing a
            # proposer could steer.
            seed = canonical("secagg/graph/v2", beacon, round_)
        else:
            seed = canonical("secagg/graph/v1", session_id, round_)
        return cls.harary(peers, degree, seed)

    def neighbourhood(self, u: str) -> frozenset[str]:
        """``u``'s neighbours and ``u`` itself."""
        return self.neighbours[u] | {u}

    def max_neighbourhood(self) -> int:
        return max(len(vs) for vs in self.neighbours.values()) + 1

    def min_neighbourhood(self) -> int:
        return min(len(vs) for vs in self.neighbours.values()) + 1


def _check_roster(peers: Sequence[str]) -> tuple[str, ...]:
    roster = tuple(peers)
    if len(roster) < 2:
        raise ConfigError(f"a round needs at least 2 peers, not {len(roster)}")
    if len(set(roster)) != len(roster):
        raise ConfigError("peer ids in the roster must be unique")
    return roster


def _permutation(n: int, seed: bytes) -> list[int]:
    """Fisher-Yates with unbiased (rejection-sampled) draws from a seeded AES-CTR stream."""
    rng = DeterministicRandom(seed)
    order = list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 32) - (1 << 32) % bound
        while True:
            draw = int.from_bytes(rng.token_bytes(4), "big")
            if draw < limit:
                break
        j = draw % bound
        order[i], order[j] = order[j], order[i]
    return order


def _binomial_tail_at_least(n: int, p: float, k: int) -> float:
    """P[Binomial(n, p) >= k]."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(max(k, 0), n + 1))


def recommend_parameters(
    n: int, dropout_fraction: float, corruption_fraction: float, sigma: int = 40
) -> tuple[int, int]:
    """The smallest even SecAgg+ degree k and a threshold t meeting the bounds above.

    Returns ``(k, t)``; when no sparse graph is enough, ``k = n - 1`` (the complete graph).
    Raises ConfigError when even the complete graph cannot meet the bounds.
    """
    if not (0 <= dropout_fraction < 1 and 0 <= corruption_fraction < 1):
        raise ConfigError("dropout and corruption fractions must be in [0, 1)")
    if n < 2:
        raise ConfigError(f"a round needs at least 2 peers, not {n}")
    risk = 2.0**-sigma
    for k in [*range(2, n - 1, 2), n - 1]:
        h = k + 1
        for t in range(minimum_threshold(h), h + 1):
            private = _binomial_tail_at_least(h, corruption_fraction, t) <= risk
            live = 1 - _binomial_tail_at_least(h, 1 - dropout_fraction, t) <= risk
            if private and live:
                return k, t
    # Small rosters: the probabilistic bound is unreachable, fall back to the worst case on
    # both sides: every allowed dropout happens and the corrupted peers alone stay below t.
    lowest = max(minimum_threshold(n), math.floor(corruption_fraction * n) + 1)
    if lowest <= n - math.ceil(dropout_fraction * n):
        return n - 1, lowest
    raise ConfigError(
        f"no threshold tolerates {dropout_fraction:.0%} dropouts and {corruption_fraction:.0%} "
        f"corruptions with {n} peers"
    )
