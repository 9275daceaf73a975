"""Neighbour graphs: complete (SecAgg, Bonawitz et al. 2017) and random Harary (SecAgg+).

In SecAgg every peer masks with and secret-shares to every other peer: per-peer cost is
O(n·m). SecAgg+ (Bell et al., CCS 2020) replaces the complete graph with a random k-regular
graph, k = O(log n): a Harary graph H(k, n) (each peer linked to the k/2 nearest on each side
of a ring) over a random permutation of the roster. The permutation is derived from a public
seed (:func:`graph_seed`: the session's beacon, session id, round and attempt), so every peer
computes the same graph without a message, and nobody could choose it in advance.

Each peer's *neighbourhood* is its neighbours plus itself: it Shamir-shares its secrets
t-of-|neighbourhood| to exactly these peers, and its pairwise masks are with its neighbours.

Choosing k and t (see :func:`parameter_problem` and :func:`recommend_parameters`; the
argument is in SECURITY.md). Let c be the number of roster members that may collude with the
aggregator (counting the aggregator's own peer when it is on the roster), h = k + 1 the
neighbourhood size, and c_h the most colluders that any honest peer's neighbourhood holds,
except with probability 2^-sigma over the graph's randomness (a union bound over the n
peers of the hypergeometric tail; c_h = c for the complete graph). Then:

* t > (h + c_h) / 2 (Bell et al. 2020): two groups of t share holders in one neighbourhood
  must share an honest member, who answers only one of them;
* t >= c_h + 2: a survivor is unmasked only if at least t - 1 of its mask partners survived
  (see participant.py), and they cannot all be colluders;
* liveness: the surviving members must reach t, P[Binomial(h, 1 - d) < t] <= 2^-sigma.

Independently of t, every round needs a roster-wide quorum of consistency signatures
(:func:`consistency_quorum`), so that only one survivor set is ever unmasked. For the
complete graph (h = n, c_h = c) the first bound is t > (n + c) / 2. The smallest even k
meeting these grows as O(log n) for fixed d, c and sigma, which is why the SecAgg+ per-peer
cost curve is nearly flat in n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

from .crypto import GRAPH_INFO, DeterministicRandom, canonical, hkdf_sha256
from .errors import ConfigError

__all__ = [
    "DEFAULT_SIGMA",
    "GraphKind",
    "NeighbourGraph",
    "colluders_per_neighbourhood",
    "consistency_quorum",
    "graph_seed",
    "minimum_threshold",
    "parameter_problem",
    "recommend_parameters",
    "safe_threshold",
    "validate_threshold",
]

# Statistical security parameter: the graph may put more than c_h colluders into some honest
# peer's neighbourhood with probability at most 2^-DEFAULT_SIGMA.
DEFAULT_SIGMA = 40
BEACON_BYTES = 32


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
        *,
        attempt: int = 0,
        beacon: bytes = b"",
    ) -> NeighbourGraph:
        """The graph of one round attempt; SecAgg+ graphs are re-drawn every attempt."""
        if kind is GraphKind.COMPLETE:
            return cls.complete(peers)
        if degree is None:
            raise ConfigError("a SecAgg+ graph needs a degree")
        return cls.harary(peers, degree, graph_seed(beacon, session_id, round_, attempt))

    def neighbourhood(self, u: str) -> frozenset[str]:
        """``u``'s neighbours and ``u`` itself."""
        return self.neighbours[u] | {u}

    def max_neighbourhood(self) -> int:
        return max(len(vs) for vs in self.neighbours.values()) + 1

    def min_neighbourhood(self) -> int:
        return min(len(vs) for vs in self.neighbours.values()) + 1


def graph_seed(beacon: bytes, session_id: str, round_: int, attempt: int) -> bytes:
    """The SecAgg+ permutation seed: HKDF over the round's public beacon.

    The beacon is randomness fixed only after every peer accepted the session (the peer's
    commit-reveal), so whoever chose the session id cannot steer the graph: without the
    beacon every session id gives a uniformly random graph. An empty beacon (simulations and
    tests only) leaves the seed to (session, round, attempt) alone, which is grindable.
    """
    if beacon and len(beacon) != BEACON_BYTES:
        raise ConfigError(f"beacon must be {BEACON_BYTES} bytes (or empty), not {len(beacon)}")
    return hkdf_sha256(beacon, GRAPH_INFO + canonical(session_id, round_, attempt))


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


def _hypergeometric_tail_above(population: int, marked: int, draws: int, k: int) -> float:
    """P[X > k] for X the marked items among ``draws`` drawn without replacement."""
    total = math.comb(population, draws)
    above = sum(
        math.comb(marked, i) * math.comb(population - marked, draws - i)
        for i in range(k + 1, min(marked, draws) + 1)
    )
    return above / total


def neighbourhood_size(n: int, kind: GraphKind, degree: int | None) -> int:
    """h: the neighbourhood size (neighbours plus the peer itself) of every peer."""
    if kind is GraphKind.COMPLETE or degree is None or degree >= n - 1:
        return n
    return degree + 1


@lru_cache(maxsize=1024)
def colluders_per_neighbourhood(
    n: int, neighbourhood: int, colluders: int, sigma: int = DEFAULT_SIGMA
) -> int:
    """c_h: the most colluders in any honest peer's neighbourhood, but for 2^-sigma.

    In a Harary graph over a uniformly random permutation, an honest peer's h - 1 neighbours
    are a uniform (h - 1)-subset of the other n - 1 peers, so its colluding neighbours are
    hypergeometric; a union bound over the n peers covers *every* neighbourhood, not one
    given victim. For the complete graph every colluder is a neighbour: c_h = c.
    """
    worst = min(colluders, neighbourhood - 1)
    if neighbourhood >= n:
        return worst
    risk = 2.0**-sigma
    for c_h in range(worst):
        if n * _hypergeometric_tail_above(n - 1, colluders, neighbourhood - 1, c_h) <= risk:
            return c_h
    return worst


def consistency_quorum(n: int, colluders: int) -> int:
    """Q: consistency signatures over one survivor set that an honest peer needs before
    revealing any share. Two different survivor sets would need 2Q > n + c signatures, more
    than the n - c honest peers (each signs one set) and c colluders (sign anything) give."""
    return (n + colluders) // 2 + 1


def safe_threshold(h: int, c_h: int) -> int:
    """The smallest threshold with t > (h + c_h) / 2 and t >= c_h + 2."""
    return max((h + c_h) // 2 + 1, c_h + 2)


def parameter_problem(
    n: int,
    kind: GraphKind,
    degree: int | None,
    threshold: int,
    colluders: int,
    sigma: int = DEFAULT_SIGMA,
) -> str | None:
    """Why (n, graph, degree, threshold) is unsafe against ``colluders`` colluding roster
    members (the aggregator's own peer included), or None when it is safe.

    The conditions are those of the module docstring (argued in SECURITY.md); the one place
    that states them, used by :class:`~secagg.config.RoundConfig`, by session validation
    and by each peer's policy.
    """
    where = f"graph={kind.value}" + (f", degree={degree}" if kind is GraphKind.SECAGG_PLUS else "")
    where += f", threshold={threshold} for n={n}"
    if not 0 <= colluders < n:
        return f"colluders must be between 0 and {n - 1}, not {colluders} ({where})"
    h = neighbourhood_size(n, kind, degree)
    if threshold > h:
        return f"threshold {threshold} exceeds the neighbourhood size {h} ({where})"
    c_h = colluders_per_neighbourhood(n, h, colluders, sigma)
    low = safe_threshold(h, c_h)
    if threshold < low:
        return (
            f"{where} is too weak against {colluders} colluders: a neighbourhood of {h} may "
            f"hold {c_h} of them (beyond that with probability <= 2^-{sigma}), so the "
            f"threshold must be at least {low} (t > (h + c_h)/2 and t >= c_h + 2)"
        )
    if consistency_quorum(n, colluders) > n:
        return f"{colluders} colluders leave no honest majority to sign one survivor set ({where})"
    return None


def recommend_parameters(
    n: int, dropout_fraction: float, corruption_fraction: float, sigma: int = DEFAULT_SIGMA
) -> tuple[int, int]:
    """The smallest even SecAgg+ degree k and a threshold t meeting the bounds above, for
    ``c = ceil(corruption_fraction * n)`` colluders (aggregator included).

    Returns ``(k, t)``; when no sparse graph is enough, ``k = n - 1`` (the complete graph).
    Raises ConfigError when even the complete graph cannot meet the bounds, or when the
    dropouts leave fewer peers than the consistency quorum.
    """
    if not (0 <= dropout_fraction < 1 and 0 <= corruption_fraction < 1):
        raise ConfigError("dropout and corruption fractions must be in [0, 1)")
    if n < 2:
        raise ConfigError(f"a round needs at least 2 peers, not {n}")
    colluders = math.ceil(corruption_fraction * n)
    online = n - math.ceil(dropout_fraction * n)
    if colluders >= n or consistency_quorum(n, colluders) > online:
        raise ConfigError(
            f"{dropout_fraction:.0%} dropouts leave {online} of {n} peers, fewer than the "
            f"{consistency_quorum(n, colluders)} consistency signatures needed against "
            f"{colluders} colluders"
        )
    risk = 2.0**-sigma
    for k in range(2, n - 1, 2):
        h = k + 1
        t = safe_threshold(h, colluders_per_neighbourhood(n, h, colluders, sigma))
        if t <= h and 1 - _binomial_tail_at_least(h, 1 - dropout_fraction, t) <= risk:
            return k, t
    # The complete graph: every allowed dropout happens and the colluders stay below t.
    t = safe_threshold(n, colluders)
    if t <= online:
        return n - 1, t
    raise ConfigError(
        f"no threshold tolerates {dropout_fraction:.0%} dropouts and {corruption_fraction:.0%} "
        f"corruptions with {n} peers"
    )
