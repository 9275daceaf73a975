"""What the dashboard keeps between requests, and that a ledger change always shows.

The page of a ledger state is drawn once and served to every browser (in the layout and by
the refresh callback), and roster signatures found genuine are not verified again. The
attacks: a round appended or a metric edited in place while the dashboard runs must never
be answered with the page drawn before; a genuine signature moved onto another record (of
the same hospital) must not pass because that signature was verified before.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dash
from dashboard_testlib import PEERS, LedgerBuilder
from test_dashboard_check import _edit_metric

from dashboard.app import PageCache, _refresh, create_app
from dashboard.source import LedgerSource
from peer.ledger import ProblemKind, system_clock


def _four_planned(tmp_path: Path) -> LedgerBuilder:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=4)
    for round_, accuracy in ((1, 0.812), (2, 0.901), (3, 0.938)):
        builder.agree_round("s1", round_, {"accuracy": accuracy})
    return builder


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """Every component of a layout as Dash sends it (JSON), depth first."""
    if isinstance(node, list):
        for child in node:
            yield from _components(child)
    elif isinstance(node, dict) and "type" in node and "props" in node:
        yield node
        yield from _components(node["props"].get("children"))


def _by_id(layout: Any, component_id: str) -> dict[str, Any]:
    return next(c for c in _components(layout) if c["props"].get("id") == component_id)


def _agreed_accuracy(layout: Any) -> list[float | None]:
    figure = _by_id(layout, "quality-chart")["props"]["figure"]
    line = next(t for t in figure["data"] if t["name"] == "Accuracy")
    return list(line["y"])


def test_page_in_the_layout_follows_an_appended_round_and_an_edit(tmp_path: Path) -> None:
    builder = _four_planned(tmp_path)
    client = create_app(builder.url, verifiers=builder.verifiers()).server.test_client()
    first = client.get("/_dash-layout").get_json()
    assert _agreed_accuracy(first) == [0.812, 0.901, 0.938]
    assert client.get("/_dash-layout").get_json() == first  # unchanged ledger: same page

    builder.agree_round("s1", 4, {"accuracy": 0.955})
    appended = client.get("/_dash-layout").get_json()
    assert _agreed_accuracy(appended) == [0.812, 0.901, 0.938, 0.955]
    assert _by_id(appended, "digest")["props"]["data"] != _by_id(first, "digest")["props"]["data"]
    assert not [c for c in _components(appended) if c["props"].get("id") == "check-banner"]

    # An edit in place leaves the head as it was: the page must still be drawn again.
    _edit_metric(builder.path, 2, "accuracy", 0.999)
    edited = client.get("/_dash-layout").get_json()
    assert "round 2" in str(_by_id(edited, "check-banner")["props"]["children"])
    assert 0.999 not in _agreed_accuracy(edited)
    # The edited value itself is read again (not kept from before) and shown as not agreed.
    figure = _by_id(edited, "quality-chart")["props"]["figure"]
    grey = next(t for t in figure["data"] if t["name"].startswith("Not agreed"))
    assert 0.999 in grey["y"]
    assert _by_id(edited, "verdict")["props"]["className"] == "verdict bad"


def test_refresh_redraws_after_a_change_and_only_then(tmp_path: Path) -> None:
    """The callback path: a browser that shows an older digest gets the new page, one that
    shows the current digest gets nothing (its zoom is kept)."""
    builder = _four_planned(tmp_path)
    source = LedgerSource(builder.url, verifiers=builder.verifiers())
    cache = PageCache()
    try:
        page = _refresh(source, {}, system_clock, "s1", None, None, cache)
        digest = page[-1]
        again = _refresh(source, {}, system_clock, "s1", digest, None, cache)
        assert all(part is dash.no_update for part in again[:-3])
        _edit_metric(builder.path, 3, "accuracy", 0.5)
        changed = _refresh(source, {}, system_clock, "s1", digest, None, cache)
    finally:
        source.close()
    assert changed[-1] != digest
    banner = changed[3]
    assert banner
    assert "round 3" in str(banner)


def test_a_genuine_signature_moved_to_another_record_is_still_refused(tmp_path: Path) -> None:
    """Signatures verified once are remembered as (signature, signed bytes) pairs, so a
    hospital's genuine signature of round 2 copied onto its round 1, or onto a new round,
    is verified again and refused."""
    builder = _four_planned(tmp_path)
    source = LedgerSource(builder.url, verifiers=builder.verifiers())

    def move_signature(from_round: int, to_round: int) -> None:
        with sqlite3.connect(builder.path) as db:
            (signature,) = db.execute(
                "SELECT s.signature FROM record_signatures s JOIN agreed_records r "
                "ON s.seq = r.seq WHERE r.round = ? AND s.peer_id = ?",
                (from_round, PEERS[1]),
            ).fetchone()
            db.execute(
                "UPDATE record_signatures SET signature = ? WHERE peer_id = ? AND seq = "
                "(SELECT seq FROM agreed_records WHERE round = ?)",
                (signature, PEERS[1], to_round),
            )

    try:
        assert source.snapshot("s1").report.ok  # type: ignore[union-attr]
        move_signature(2, 1)
        replayed = source.snapshot("s1").report
        assert replayed is not None
        assert [(p.round, p.kind) for p in replayed.problems] == [(1, ProblemKind.BAD_SIGNATURE)]
        builder.agree_round("s1", 4, {"accuracy": 0.955})
        move_signature(3, 4)
        report = source.snapshot("s1").report
    finally:
        source.close()
    assert report is not None
    assert [(p.round, p.kind) for p in report.problems] == [
        (1, ProblemKind.BAD_SIGNATURE),
        (4, ProblemKind.BAD_SIGNATURE),
    ]


def test_a_page_asked_for_by_several_browsers_at_once_is_drawn_once() -> None:
    cache = PageCache()
    drawn: list[int] = []

    def draw() -> list[Any]:
        drawn.append(1)
        time.sleep(0.5)  # long enough for every other request to arrive meanwhile
        return ["page"]

    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda _: cache.get("digest", draw), range(4)))
    assert pages == [["page"]] * 4
    assert len(drawn) == 1
    assert cache.get("other", lambda: ["other page"]) == ["other page"]
