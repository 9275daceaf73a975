"""Neighbour graphs, parameter recommendation, and round configuration errors."""

from __future__ import annotations

import itertools
import math

import pytest

from secagg import ConfigError, GraphKind, NeighbourGraph, RoundConfig, recommend_parameters
from secagg.graph import _binomial_tail_at_least, minimum_threshold, validate_threshold

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


def test_harary_graph_is_reproducible_per_session_and_round() -> None:
    assert edges(build(12, 4, "s", 3)) == edges(build(12, 4, "s", 3))
    by_round = {edges(build(12, 4, "s", r)) for r in range(6)}
    assert len(by_round) == 6  # redrawn every round
    assert edges(build(12, 4, "s", 0)) != edges(build(12, 4, "t", 0))


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
    base = RoundConfig("s", 0, ("a", "b", "c"), 2, 4)
    variants = [
        RoundConfig("t", 0, ("a", "b", "c"), 2, 4),
        RoundConfig("s", 1, ("a", "b", "c"), 2, 4),
        RoundConfig("s", 0, ("a", "b", "d"), 2, 4),
        RoundConfig("s", 0, ("a", "b", "c"), 3, 4),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 5),
        RoundConfig("s", 0, ("a", "b", "c"), 2, 4, 64),
    ]
    digests = {base.digest, *(v.digest for v in variants)}
    assert len(digests) == 1 + len(variants)
    assert RoundConfig("s", 0, ("a", "b", "c"), 2, 4).digest == base.digest


# ------------------------------------------------------------------------------ recommendation

GRID = list(itertools.product((3, 5, 10, 30, 100), (0.0, 0.05, 0.2, 0.33), (0.0, 0.05, 0.2, 0.33)))


@pytest.mark.parametrize(("n", "d", "c"), GRID)
def test_recommended_parameters_satisfy_the_documented_bounds(n: int, d: float, c: float) -> None:
    risk = 2.0**-40
    try:
        k, t = recommend_parameters(n, d, c)
    except ConfigError:
        # Only allowed when no threshold of the complete graph meets even the worst case.
        assert not any(
            n - math.ceil(d * n) >= t and math.floor(c * n) < t
            for t in range(minimum_threshold(n), n + 1)
        )
        return
    assert k == n - 1 or (k % 2 == 0 and 2 <= k < n - 1)
    h = k + 1
    assert minimum_threshold(h) <= t <= h  # a strict majority of every neighbourhood
    private = _binomial_tail_at_least(h, c, t) <= risk
    live = 1 - _binomial_tail_at_least(h, 1 - d, t) <= risk
    if not (private and live):
        # The small-roster fallback: the complete graph with deterministic worst-case bounds.
        assert k == n - 1
        assert n - math.ceil(d * n) >= t  # every allowed dropout happens, t remain
        assert math.floor(c * n) < t  # the corrupted peers alone stay below t
    # And the round configuration accepts what was recommended.
    graph = GraphKind.SECAGG_PLUS if k < n - 1 else GraphKind.COMPLETE
    RoundConfig("s", 0, ROSTER[:n] if n <= 20 else tuple(map(str, range(n))), t, 1, 32, graph, k)


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
    assert recommend_parameters(10, 0.1, 0.6) == (9, 7)  # 6 corrupted: t = 7, 9 stay online


@pytest.mark.parametrize(("n", "d", "c"), [(1, 0.1, 0.1), (10, 1.0, 0.1), (10, 0.1, -0.1)])
def test_invalid_recommendation_inputs(n: int, d: float, c: float) -> None:
    with pytest.raises(ConfigError):
        recommend_parameters(n, d, c)
