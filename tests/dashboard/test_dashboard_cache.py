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


def test_only_the_picked_part_is_sent_and_the_headline_always(tmp_path: Path) -> None:
    """A page opens on the global model: the other parts are sent (and drawn) only when
    picked, from the page drawn once; the headline and the verdict are in every answer."""
    from dashboard.app import _SECTIONS, VIEWS

    builder = _four_planned(tmp_path)
    client = create_app(builder.url, verifiers=builder.verifiers()).server.test_client()
    layout = client.get("/_dash-layout").get_json()
    ids = {c["props"].get("id") for c in _components(layout)}
    assert {"metrics-table", "quality-chart", "verdict", "card-accuracy"} <= ids
    assert not {"privacy-table", "trust-table", "participation-table"} & ids
    assert _by_id(layout, "privacy-panel")["props"]["hidden"] is True
    assert _by_id(layout, "metrics-panel")["props"]["hidden"] is False

    source = LedgerSource(builder.url, verifiers=builder.verifiers())
    cache = PageCache()
    try:
        first = _refresh(source, {}, system_clock, "s1", None, None, cache)
        trust = _refresh(source, {}, system_clock, "s1", first[-1], None, cache, "trust")
        # The same part again, nothing changed: nothing sent.
        again = _refresh(source, {}, system_clock, "s1", trust[-1], None, cache, "trust")
    finally:
        source.close()
    sections = dict(zip(_SECTIONS, trust[3 : 3 + len(_SECTIONS)], strict=True))
    hidden = dict(zip((v for v, _ in VIEWS), trust[3 + len(_SECTIONS) :], strict=False))
    assert "trust-table" in str(sections["trust"])
    assert sections["metrics"] is None
    assert sections["privacy"] is None
    assert "Ledger verified" in str(sections["summary"])
    assert hidden["trust"] is False
    assert hidden["metrics"] is True
    assert all(part is dash.no_update for part in again[:-3])


def test_the_charts_script_is_the_partial_bundle_served_locally(tmp_path: Path) -> None:
    from dashboard.app import PLOTLY_PARTIAL

    builder = _four_planned(tmp_path)
    client = create_app(builder.url).server.test_client()
    index = client.get("/").get_data(as_text=True)
    assert f"/_vendor/{PLOTLY_PARTIAL}" in index
    script = client.get(f"/_vendor/{PLOTLY_PARTIAL}")
    assert script.status_code == 200
    # Every trace type the charts use is in it.
    body = script.get_data(as_text=True)
    script.close()
    assert "cartesian" in body[:200]
    for trace in ('"heatmap"', '"bar"', '"scatter"'):
        assert trace in body
    # Nothing else of the package is served (Dash answers unknown paths with its page).
    assert "def create_app" not in client.get("/_vendor/..%2Fapp.py").get_data(as_text=True)
    assert client.get("/_vendor/other.js").status_code == 404


def test_the_read_started_with_the_page_request_is_the_layouts_once() -> None:
    """The layout takes the read started when the page's HTML was asked for: one read per
    load, never one older than ``max_age_s``, and page requests while a read runs start none."""
    import threading

    from dashboard.app import Prefetch

    calls: list[int] = []
    release = threading.Event()
    now = [100.0]

    def compute() -> list[Any]:
        calls.append(1)
        release.wait(5)
        return [len(calls)]

    prefetch = Prefetch(compute, max_age_s=2.0, monotonic=lambda: now[0])
    prefetch.start()
    prefetch.start()  # a second page request while the read runs: no second read
    release.set()
    assert prefetch.take() == [1]
    assert len(calls) == 1
    # Taken once: the next layout without a page request reads anew.
    assert prefetch.take() == [2]
    # A read started longer ago than max_age_s is not used.
    prefetch.start()
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)  # the background read has run
    now[0] += 2.5
    assert prefetch.take() == [4]
    assert len(calls) == 4


def test_a_page_request_then_its_layout_show_the_ledger_as_read(tmp_path: Path) -> None:
    builder = _four_planned(tmp_path)
    client = create_app(builder.url, verifiers=builder.verifiers()).server.test_client()
    page = client.get("/")
    assert page.status_code == 200
    page.close()
    layout = client.get("/_dash-layout").get_json()
    assert _agreed_accuracy(layout) == [0.812, 0.901, 0.938]
    # An edit afterwards: the next layout (no page request in between) reads it.
    _edit_metric(builder.path, 3, "accuracy", 0.5)
    edited = client.get("/_dash-layout").get_json()
    assert _by_id(edited, "check-banner")


class _Counting:
    """A roster key that counts the signatures it is asked to verify."""

    def __init__(self, inner: Any, calls: list[int]) -> None:
        self._inner = inner
        self._calls = calls

    def verify(self, signature: bytes, data: bytes) -> bool:
        self._calls.append(1)
        return bool(self._inner.verify(signature, data))


def test_the_ledger_is_checked_at_start_so_the_first_reader_does_not_wait(
    tmp_path: Path,
) -> None:
    # With 20,000 signatures the check takes seconds: `dashboard` does it when it starts
    # (warm_up), not when the first reader opens the page.
    import threading

    builder = _four_planned(tmp_path)
    calls: list[int] = []
    verifiers = {peer: _Counting(v, calls) for peer, v in builder.verifiers().items()}
    ready = threading.Event()
    app = create_app(builder.url, verifiers=verifiers, warm_up=ready)
    assert ready.wait(60), "the warm-up did not finish"
    checked_at_start = len(calls)
    assert checked_at_start >= 3 * len(PEERS)  # every signature of the three rounds
    layout = app.server.test_client().get("/_dash-layout").get_json()
    assert _agreed_accuracy(layout) == [0.812, 0.901, 0.938]
    assert len(calls) == checked_at_start  # nothing verified again for the first reader
    # A round appended afterwards is still checked (only its signatures are new).
    builder.agree_round("s1", 4, {"accuracy": 0.95})
    layout = app.server.test_client().get("/_dash-layout").get_json()
    assert _agreed_accuracy(layout) == [0.812, 0.901, 0.938, 0.95]
    assert len(calls) > checked_at_start
