"""Page load of the dashboard over a large ledger (default: 1,000 rounds, 20 hospitals).

::

    python -m scripts.bench_dashboard --rounds 1000 --hospitals 20 [--roster] [--browser]

Builds a ledger with real signatures (every hospital signs every round, as peers do), then
measures, each best of ``--repeat``:

- ``check_*``: :func:`peer.ledger.verify_ledger` of the whole ledger (keyless, and with the
  roster when ``--roster``), which the dashboard runs once per ledger state;
- ``first_draw``: the server's work for the first page of a new ledger state (read, check,
  build every table and figure);
- ``page_again``: the server's work when another browser opens the page in that state (read,
  compare, send the page drawn before);
- ``tick_unchanged``: a browser's periodic refresh when nothing changed;
- ``after_append``: the server's work for the first page after a peer appended a round
  while the dashboard runs (check again, read, draw; signatures verified before are
  remembered);
- ``warm_up`` (``--browser``): what ``dashboard`` does when it starts, before it serves
  anyone: read and check the whole ledger and draw the first page;
- ``browser_first``/``browser_again``/``browser_after_append`` (``--browser``): headless
  Chromium from navigation until the headline figures, the ledger-check card and the
  verdict are shown (with the red banner, when the check fails: it is part of the same
  first answer) and every chart on the page has drawn its traces, for the first load after
  the warm-up (a cold browser), for later loads of an unchanged ledger (what a reader waits for) and
  for the first load after one more round was appended. The page opens on the global
  model's part; the other parts are drawn when picked, so
- ``browser_view_*`` (``--browser``): from picking another part of the page (privacy,
  participation, trust, statistics) until its content and every chart in it are drawn.

The ledger is written afresh under ``--dir`` (``--reuse``: the one of an earlier run, to
which each run appends two rounds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


# Rounds planned beyond those written, so that runs can append rounds as a peer would.
SPARE_ROUNDS = 100


def _peers(hospitals: int) -> list[str]:
    return [f"hospital-{i:02d}" for i in range(1, hospitals + 1)]


def _agree(builder: Any, round_: int, rounds: int, peers: list[str]) -> None:
    progress = min(round_ / rounds, 1.0)
    builder.agree_round(
        "big",
        round_,
        {"accuracy": 0.5 + 0.4 * progress, "auc": 0.6 + 0.3 * progress, "loss": 1 - progress / 2},
        epsilon=dict.fromkeys(peers, 0.01),
    )


def _testlib() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dashboard"))
    import dashboard_testlib  # the tests' ledger writer, real signatures

    return dashboard_testlib


def _build(directory: Path, rounds: int, hospitals: int) -> Any:
    peers = _peers(hospitals)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    builder = _testlib().LedgerBuilder.create(directory, peers=peers)
    builder.add_session("big", rounds=rounds + SPARE_ROUNDS, threshold=hospitals // 2 + 1)
    builder.accept("big")  # every hospital's signed acceptance, checked at every page
    started = time.perf_counter()
    for round_ in range(1, rounds + 1):
        _agree(builder, round_, rounds, peers)
        if round_ % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"  {round_} rounds written ({elapsed:.0f} s)", file=sys.stderr)
    return builder


def _reopen(directory: Path, hospitals: int) -> Any:
    """The writer of a ledger built by an earlier run (its keys are under ``federation/``)."""
    from types import SimpleNamespace

    from peer.identity import load_certificate, load_roster

    federation = directory / "federation"
    ca = load_certificate(federation / "ca" / "ca.pem")
    peers = _peers(hospitals)
    files = SimpleNamespace(
        members={p: SimpleNamespace(key=federation / p / f"{p}.key") for p in peers},
        roster=load_roster(federation / "roster.json", ca),
    )
    return _testlib().LedgerBuilder(directory / "ledger.db", files, peers=tuple(peers))


def _append(builder: Any, rounds: int, hospitals: int) -> None:
    """One more agreed round, signed by every hospital: a new ledger state."""
    import sqlite3

    with sqlite3.connect(builder.path) as db:
        (last,) = db.execute("SELECT MAX(round) FROM agreed_records").fetchone()
    _agree(builder, int(last) + 1, rounds, _peers(hospitals))


def _best(function: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_dashboard", description=__doc__)
    parser.add_argument("--rounds", type=int, default=1000)
    parser.add_argument("--hospitals", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("bench-results/dashboard"))
    parser.add_argument("--roster", action="store_true", help="also check signatures")
    parser.add_argument("--browser", action="store_true", help="time a headless Chromium")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the ledger of an earlier run under --dir"
    )
    args = parser.parse_args(argv)

    from plotly.utils import PlotlyJSONEncoder

    from dashboard.app import PageCache, _refresh
    from dashboard.source import LedgerSource
    from peer.ledger import Ledger, system_clock, verify_ledger

    directory = args.dir / f"{args.rounds}x{args.hospitals}"
    ledger_path = directory / "ledger.db"
    if args.reuse and ledger_path.is_file():
        builder = _reopen(directory, args.hospitals)
    else:
        builder = _build(directory, args.rounds, args.hospitals)
    ledger_url = f"sqlite:///{ledger_path}"
    verifiers = None
    if args.roster:
        from peer.identity import load_certificate, load_roster

        federation = directory / "federation"
        ca = load_certificate(federation / "ca" / "ca.pem")
        verifiers = load_roster(federation / "roster.json", ca).verifiers()
    results: dict[str, float] = {}
    with Ledger(ledger_url) as ledger:
        results["check_keyless_s"] = _best(lambda: verify_ledger(ledger, None), args.repeat)
        if verifiers is not None:
            results["check_roster_s"] = _best(lambda: verify_ledger(ledger, verifiers), args.repeat)

    def refresh(source: LedgerSource, cache: PageCache, shown: str | None = None) -> Any:
        return _refresh(source, {}, system_clock, None, shown, None, cache)

    def first_draw() -> None:
        source = LedgerSource(ledger_url, verifiers=verifiers)
        try:
            refresh(source, PageCache())
        finally:
            source.close()

    # A new ledger state: check, read, draw every table and figure.
    results["first_draw_s"] = _best(first_draw, args.repeat)
    source = LedgerSource(ledger_url, verifiers=verifiers)
    cache = PageCache()
    page = refresh(source, cache)
    digest = page[-1]
    # Another browser opening the page in the same ledger state: read, compare, send.
    results["page_again_s"] = _best(lambda: refresh(source, cache), args.repeat)
    # A browser's periodic refresh when nothing changed.
    results["tick_unchanged_s"] = _best(lambda: refresh(source, cache, digest), args.repeat)
    # A peer agrees one more round while the dashboard runs: the first page of the new state
    # (check again, read, draw), with what this source kept from the state before.
    _append(builder, args.rounds, args.hospitals)
    started = time.perf_counter()
    page = refresh(source, cache, digest)
    results["after_append_s"] = time.perf_counter() - started
    source.close()
    results["page_json_bytes"] = float(len(json.dumps(page, cls=PlotlyJSONEncoder)))
    if args.browser:
        warm_up, first, again, appended, views = _browser_page(
            ledger_url,
            verifiers,
            args.repeat,
            lambda: _append(builder, args.rounds, args.hospitals),
        )
        results["warm_up_s"] = warm_up
        results["browser_first_s"] = first
        results["browser_again_s"] = again
        results["browser_after_append_s"] = appended
        for view, seconds in views.items():
            results[f"browser_view_{view}_s"] = seconds
    print(json.dumps({"rounds": args.rounds, "hospitals": args.hospitals, **results}, indent=2))
    return 0


# The headline figures, the ledger-check card and the verdict are on screen, and every
# chart of the page has drawn its traces.
_DRAWN = """
const verdict = document.getElementById("verdict");
const check = document.getElementById("card-check");
const headline = document.querySelector(".cards .card-value");
const graphs = [...document.querySelectorAll(".dash-graph")];
return Boolean(verdict && verdict.textContent && check && check.textContent && headline)
    && graphs.length > 0 && graphs.every(g => g.querySelector(".main-svg .trace"));
"""

# The part of the page picked (arguments[0]) is shown, filled, and its charts drawn.
_VIEW_DRAWN = """
const panel = document.getElementById(arguments[0] + "-panel");
if (!panel || panel.hidden) return false;
const body = panel.querySelector(":scope > div:last-child");
if (!body || !body.children.length) return false;
const graphs = [...panel.querySelectorAll(".dash-graph")];
return graphs.every(g => g.querySelector(".main-svg .trace"));
"""

# The parts of the page timed when picked (the global model's is the one shown at load).
_VIEWS = ("privacy", "participation", "trust", "stats")


def _wait(driver: Any, script: str, *args: Any) -> float:
    started = time.perf_counter()
    while not driver.execute_script(script, *args):
        if time.perf_counter() - started > 120:
            raise TimeoutError("the page did not show its verdict and charts in 120 s")
        time.sleep(0.02)
    return time.perf_counter() - started


def _browser_page(
    url: str, verifiers: Any, repeat: int, append: Callable[[], None]
) -> tuple[float, float, float, float, dict[str, float]]:
    """Seconds the dashboard's start-up check takes (read, check, first page drawn: what
    ``dashboard`` does before the first reader comes); then seconds until the headline, the
    verdict and the charts show: the first load after that (a cold browser), the best of
    ``repeat`` later loads, and the
    first load after ``append`` added a round; then the seconds each other part of the page
    takes to show once picked (none when the page has no parts)."""
    import tempfile
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from werkzeug.serving import make_server

    from dashboard.app import create_app

    ready = threading.Event()
    started = time.perf_counter()
    app = create_app(url, verifiers=verifiers, interval_s=60, warm_up=ready)
    ready.wait()  # as `dashboard` does: the ledger is checked before the first reader comes
    warm_up = time.perf_counter() - started
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="bench-dashboard-")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1300,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"),
        options=options,
    )
    page = f"http://127.0.0.1:{server.server_port}/"
    times = []
    views: dict[str, float] = {}
    try:
        for load in range(repeat + 2):
            if load == repeat + 1:
                append()
            driver.get("about:blank")
            started = time.perf_counter()
            driver.get(page)
            _wait(driver, _DRAWN)
            times.append(time.perf_counter() - started)
        from selenium.webdriver.common.by import By

        for view in _VIEWS:
            radio = driver.find_elements(By.CSS_SELECTOR, f"#view input[value='{view}']")
            if not radio:
                break  # a page drawn whole (before the parts)
            started = time.perf_counter()
            radio[0].click()
            _wait(driver, _VIEW_DRAWN, view)
            views[view] = time.perf_counter() - started
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    return warm_up, times[0], min(times[1:-1]), times[-1], views


if __name__ == "__main__":
    raise SystemExit(main())
