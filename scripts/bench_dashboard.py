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
- ``browser_first``/``browser_again`` (``--browser``): headless Chromium from navigation until
  the verdict and the charts are on screen, for the first load after the server started and
  for later loads (what a reader waits for).

The ledger is written afresh under ``--dir``.
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


def _build(directory: Path, rounds: int, hospitals: int) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dashboard"))
    from dashboard_testlib import LedgerBuilder  # the tests' ledger writer, real signatures

    peers = [f"hospital-{i:02d}" for i in range(1, hospitals + 1)]
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    builder = LedgerBuilder.create(directory, peers=peers)
    builder.add_session("big", rounds=rounds, threshold=hospitals // 2 + 1)
    started = time.perf_counter()
    for round_ in range(1, rounds + 1):
        progress = round_ / rounds
        builder.agree_round(
            "big",
            round_,
            {
                "accuracy": 0.5 + 0.4 * progress,
                "auc": 0.6 + 0.3 * progress,
                "loss": 1 - progress / 2,
            },
            epsilon=dict.fromkeys(peers, 0.01),
        )
        if round_ % 100 == 0:
            elapsed = time.perf_counter() - started
            print(f"  {round_} rounds written ({elapsed:.0f} s)", file=sys.stderr)
    return builder


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
    if not (args.reuse and ledger_path.is_file()):
        _build(directory, args.rounds, args.hospitals)
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
    source.close()
    results["page_json_bytes"] = float(len(json.dumps(page, cls=PlotlyJSONEncoder)))
    if args.browser:
        first, again = _browser_page(ledger_url, verifiers, args.repeat)
        results["browser_first_s"] = first
        results["browser_again_s"] = again
    print(json.dumps({"rounds": args.rounds, "hospitals": args.hospitals, **results}, indent=2))
    return 0


def _browser_page(url: str, verifiers: Any, repeat: int) -> tuple[float, float]:
    """Seconds until the verdict and the charts show: the first load after the server
    started (nothing drawn yet), and the best of ``repeat`` later loads."""
    import tempfile
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from werkzeug.serving import make_server

    from dashboard.app import create_app

    app = create_app(url, verifiers=verifiers, interval_s=60)
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
    try:
        for _ in range(repeat + 1):
            driver.get("about:blank")
            started = time.perf_counter()
            driver.get(page)
            while True:
                verdict = driver.find_elements(By.ID, "verdict")
                charts = driver.find_elements(By.CSS_SELECTOR, "#quality-chart .main-svg")
                if verdict and verdict[0].text and charts:
                    break
                if time.perf_counter() - started > 120:
                    raise TimeoutError("the page did not show its verdict and charts in 120 s")
                time.sleep(0.02)
            times.append(time.perf_counter() - started)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    return times[0], min(times[1:])


if __name__ == "__main__":
    raise SystemExit(main())
