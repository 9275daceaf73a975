"""Neighbour graphs, parameter recommendation, and round configuration errors."""

from __future__ import annotations

import itertools
import math

import pytest
from scipy import stats

from secagg import ConfigError, GraphKind, NeighbourGraph, RoundConfig, recommend_parameters
from secagg.graph import (
    colluders_per_neighbourhood,
    consistency_quorum,
    minimum_threshold,
    parameter_problem,
    safe_threshold,
    validate_threshold,
)

ROSTER = tuple(f"peer-{i:02d}" for i in range(20))


def build(n: int, k: int, session: str = "s", round_: int = 0) -> NeighbourGraph:
    return NeighbourGraph.build(GraphKind.SECAGG_PLUS, ROSTER[:n], k, session, round_)


def edges(graph: NeighbourGraph) -> frozenset[frozenset[str]]:
    return frozenset(frozenset((u, v)) for u, vs in graph.neighbours.items() for v in vs)


@pytest.mark.parametrize(
    ("n", "k"), [(n, k) for n in (4, 5, 8, 11, 20) for k in range(2, n - 1, 2)]
)
def test_harary_graph_is_k_regular_and_symmetric(n: int, k: int) -> None:
    graph = build(n, k)
    assert graph.kind is GraphKind.SECAGG_PLUS
    assert set(graph.neighbours) == set(ROSTER[:n])
    for u, vs in graph.neighbours.items():
        assert len(vs) == k
        assert u not in vs
        assert vs <= set(ROSTER[:n])
        assert all(u in graph.neighbours[v] for v in vs)
        assert graph.neighbourhood(u) == vs | {u}
    assert graph.min_neighbourhood() == graph.max_neighbourhood() == k + 1


@pytest.mark.parametrize(("n", "k"), [(8, 2), (11, 4), (20, 6)])
def test_harary_graph_is_connected(n: int, k: int) -> None:
    graph = build(n, k)
    seen, frontier = {ROSTER[0]}, [ROSTER[0]]
    while frontier:
        for v in graph.neighbours[frontier.pop()]:
            if v not in seen:
                seen.add(v)
                frontier.append(v)
    assert seen == set(ROSTER[:n])


def test_harary_graph_is_reproducible_per_session_round_attempt_and_beacon() -> None:
    assert edges(build(12, 4, "s", 3)) == edges(build(12, 4, "s", 3))
    by_round = {edges(build(12, 4, "s", r)) for r in range(6)}
    assert len(by_round) == 6  # redrawn every round
    assert edges(build(12, 4, "s", 0)) != edges(build(12, 4, "t", 0))

    def drawn(attempt: int, beacon: bytes) -> frozenset[frozenset[str]]:
        return edges(
            NeighbourGraph.build(
                GraphKind.SECAGG_PLUS, ROSTER[:12], 4, "s", 0, attempt=attempt, beacon=beacon
            )
        )

    assert len({drawn(a, bytes(32)) for a in range(6)}) == 6  # redrawn every attempt
    assert len({drawn(0, bytes([b]) * 32) for b in range(6)}) == 6  # and by the beacon
    with pytest.raises(ConfigError, match="beacon must be 32 bytes"):
        drawn(0, b"short")


def test_large_degree_gives_the_complete_graph() -> None:
    complete = NeighbourGraph.complete(ROSTER[:6])
    for k in (5, 6, 40):
        assert dict(build(6, k).neighbours) == dict(complete.neighbours)
    assert all(len(vs) == 5 for vs in complete.neighbours.values())


@pytest.mark.parametrize("k", [0, 1, 3, -2])
def test_invalid_degree_is_a_config_error(k: int) -> None:
    with pytest.raises(ConfigError, match="even and at least 2"):
        build(10, k)


def test_secagg_plus_needs_a_degree() -> None:
    with pytest.raises(ConfigError, match="needs a degree"):
        NeighbourGraph.build(GraphKind.SECAGG_PLUS, ROSTER[:5], None, "s", 0)


@pytest.mark.parametrize("roster", [ROSTER[:1], (), ("a", "b", "a")])
def test_invalid_roster_is_a_config_error(roster: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError):
        NeighbourGraph.complete(roster)


@pytest.mark.parametrize(
    ("n", "t", "graph", "degree"),
    [
        (5, 2, GraphKind.COMPLETE, None),  # not a strict majority of 5
        (5, 6, GraphKind.COMPLETE, None),  # more than the neighbourhood
        (6, 3, GraphKind.COMPLETE, None),  # exactly half is not a majority
        (10, 2, GraphKind.SECAGG_PLUS, 4),  # neighbourhood 5 needs t >= 3
        (10, 6, GraphKind.SECAGG_PLUS, 4),  # above neighbourhood 5
        (10, 0, GraphKind.COMPLETE, None),
    ],
)
def test_invalid_threshold_is_a_config_error(
    n: int, t: int, graph: GraphKind, degree: int | None
) -> None:
    with pytest.raises(ConfigError, match="threshold"):
        RoundConfig("s", 0, ROSTER[:n], t, 4, 32, graph, degree)


def test_threshold_bounds() -> None:
    for h in range(1, 30):
        low = minimum_threshold(h)
        assert 2 * low > h >= 2 * (low - 1)
        validate_threshold(low, h)
        validate_threshold(h, h)
        with pytest.raises(ConfigError):
            validate_threshold(low - 1, h)
        with pytest.raises(ConfigError):
            validate_threshold(h + 1, h)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"session_id": ""},
        {"session_id": "x" * 129},
        {"round": -1},
        {"peers": ("a", "")},
        {"vector_length": 0},
        {"bits": 16},
    ],
)
def test_invalid_round_config_is_a_config_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "session_id": "s",
        "round": 0,
        "peers": ("a", "b", "c"),
        "threshold": 2,
        "vector_length": 4,
        "bits": 32,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError):
        RoundConfig(**args)  # type: ignore[arg-type]


def test_config_digest_binds_every_parameter() -> None:
    """Including the attempt: a transcript of another attempt of the round never verifies."""
    base = RoundConfig("s", 0, ("a", "b", "c"), 2, 4)
    variants = [
        RoundConfig("t", 0, ("a", "b", "c"), 2, 4),
        RoundConfig("s", 1, ("a", "b", "c"), 2, 4),
        RoundConfig("s", 0, ("a", "b", "d"), 2, 4),
        RoundConfig("s", 0, ("a", "b", "c"), 3, 4),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 5),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 4, 64),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 4, attempt=1),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 4, beacon=bytes(32)),
        RoundConfig("s", 0, ("a", "b", "c", "d"), 3, 4),
        RoundConfig("s", 0, ("a", "b", "c", "d"), 3, 4, colluders=1),
    ]
    digests = {base.digest, *(v.digest for v in variants)}
    assert len(digests) == 1 + len(variants)
    assert RoundConfig("s", 0, ("a", "b", "c"), 2, 4).digest == base.digest


# ------------------------------------------------------------------------------ recommendation

GRID = list(itertools.product((3, 5, 10, 30, 100), (0.0, 0.05, 0.2, 0.33), (0.0, 0.05, 0.2, 0.33)))


@pytest.mark.parametrize(("n", "d", "c"), GRID)
def test_recommended_parameters_satisfy_the_documented_bounds(n: int, d: float, c: float) -> None:
    risk = 2.0**-40
    colluders = math.ceil(c * n)
    online = n - math.ceil(d * n)
    try:
        k, t = recommend_parameters(n, d, c)
    except ConfigError:
        # Only when even the complete graph cannot: no quorum or no safe threshold online.
        assert consistency_quorum(n, colluders) > online or safe_threshold(n, colluders) > online
        return
    assert k == n - 1 or (k % 2 == 0 and 2 <= k < n - 1)
    graph = GraphKind.SECAGG_PLUS if k < n - 1 else GraphKind.COMPLETE
    assert parameter_problem(n, graph, k, t, colluders) is None
    h = min(k, n - 1) + 1
    c_h = colluders_per_neighbourhood(n, h, colluders)
    assert 2 * t > h + c_h
    assert t >= c_h + 2
    assert t <= h
    assert consistency_quorum(n, colluders) <= online  # enough peers remain to sign
    if k < n - 1:
        # The claim, recomputed independently (scipy): over the random graph, no honest
        # peer's neighbourhood holds more than c_h colluders but with probability <= 2^-40
        # (union bound over the n peers), and the survivors reach t.
        assert n * stats.hypergeom.sf(c_h, n - 1, colluders, h - 1) <= risk * (1 + 1e-9)
        assert stats.binom.cdf(t - 1, h, 1 - d) <= risk * (1 + 1e-9)
    else:
        assert online >= t  # every allowed dropout happens, t remain
        assert c_h == colluders
    # And the round configuration accepts what was recommended.
    RoundConfig(
        "s",
        0,
        ROSTER[:n] if n <= 20 else tuple(map(str, range(n))),
        t,
        1,
        32,
        graph,
        k,
        colluders=colluders,
    )


def test_the_old_recommendations_are_refused() -> None:
    """Issue 9 items 2-3: k = 48, t = 25 at n = 100 (5 % corrupted) and the complete graph's
    t = n//2 + 1 against 1 (odd n) or 2 (even n) colluders."""
    assert parameter_problem(100, GraphKind.SECAGG_PLUS, 48, 25, 5) is not None
    assert parameter_problem(11, GraphKind.COMPLETE, None, 6, 1) is not None
    assert parameter_problem(12, GraphKind.COMPLETE, None, 7, 2) is not None
    assert parameter_problem(50, GraphKind.SECAGG_PLUS, 2, 2, 1) is not None
    assert parameter_problem(11, GraphKind.COMPLETE, None, 7, 1) is None


def test_colluders_per_neighbourhood_is_a_union_bound_over_every_peer() -> None:
    """Not "a given victim": with 5 colluders of 100 and k = 48, a given victim has more
    than 6 colluding neighbours with probability ~0.07 (above 2^-40 by far): c_h is the
    bound that holds for all 100 neighbourhoods at once."""
    c_h = colluders_per_neighbourhood(100, 49, 5)
    assert stats.hypergeom.sf(c_h - 1, 99, 5, 48) * 100 > 2.0**-40
    assert stats.hypergeom.sf(c_h, 99, 5, 48) * 100 <= 2.0**-40
    assert colluders_per_neighbourhood(100, 100, 5) == 5  # complete graph: all of them


def test_recommended_degree_grows_slowly() -> None:
    k100, _ = recommend_parameters(100, 0.1, 0.1)
    k1000, _ = recommend_parameters(1000, 0.1, 0.1)
    assert k100 < 99
    assert k1000 < 200
    assert k1000 >= k100


def test_small_roster_fallback_accounts_for_corruption() -> None:
    """The worst-case fallback must not ignore corruption."""
    with pytest.raises(ConfigError):
        recommend_parameters(5, 0.1, 0.9)  # 4 of 5 corrupted reach any threshold that 4 meet
    # 6 corrupted: t > (10 + 6)/2, so t = 9, and 9 stay online to sign (quorum 9).
    assert recommend_parameters(10, 0.1, 0.6) == (9, 9)


@pytest.mark.parametrize(("n", "d", "c"), [(1, 0.1, 0.1), (10, 1.0, 0.1), (10, 0.1, -0.1)])
def test_invalid_recommendation_inputs(n: int, d: float, c: float) -> None:
    with pytest.raises(ConfigError):
        recommend_parameters(n, d, c)
