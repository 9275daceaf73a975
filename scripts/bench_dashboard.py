"""Page load of the dashboard over a large ledger (default: 1,000 rounds, 20 hospitals).

::

    python -m scripts.bench_dashboard --rounds 1000 --hospitals 20 [--roster] [--browser]

Builds a ledger with real signatures (every hospital signs every round, as peers do), then
measures, each best of ``--repeat``:

- ``check``: :func:`peer.ledger.verify_ledger` of the whole ledger (keyless, and with the
  roster when ``--roster``), which the dashboard runs once per ledger state;
- ``refresh, cold``: the server's work for one page refresh when the ledger changed (read,
  check, build every table and figure);
- ``refresh, warm``: the same with the check cached (the ledger did not change);
- ``page``: with ``--browser``, headless Chromium from navigation until the verdict and the
  charts are on screen (what a reader waits for).

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
    args = parser.parse_args(argv)

    from dashboard.app import _refresh
    from dashboard.source import LedgerSource
    from peer.ledger import Ledger, system_clock, verify_ledger

    directory = args.dir / f"{args.rounds}x{args.hospitals}"
    builder = _build(directory, args.rounds, args.hospitals)
    verifiers = builder.verifiers() if args.roster else None
    results: dict[str, float] = {}
    with Ledger(builder.url) as ledger:
        results["check_keyless_s"] = _best(lambda: verify_ledger(ledger, None), args.repeat)
        if verifiers is not None:
            results["check_roster_s"] = _best(lambda: verify_ledger(ledger, verifiers), args.repeat)

    def refresh(source: LedgerSource) -> Any:
        return _refresh(source, {}, system_clock, "big", None)

    def cold() -> None:
        source = LedgerSource(builder.url, verifiers=verifiers)
        try:
            refresh(source)
        finally:
            source.close()

    results["refresh_cold_s"] = _best(cold, args.repeat)
    warm_source = LedgerSource(builder.url, verifiers=verifiers)
    refresh(warm_source)
    results["refresh_warm_s"] = _best(lambda: refresh(warm_source), args.repeat)
    warm_source.close()
    payload = refresh(LedgerSource(builder.url, verifiers=verifiers))
    results["refresh_json_bytes"] = float(len(json.dumps(payload, default=str)))
    if args.browser:
        results["page_s"] = _browser_page(builder.url, verifiers, args.repeat)
    print(json.dumps({"rounds": args.rounds, "hospitals": args.hospitals, **results}, indent=2))
    return 0


def _browser_page(url: str, verifiers: Any, repeat: int) -> float:
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
        for _ in range(repeat):
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
    return min(times)


if __name__ == "__main__":
    raise SystemExit(main())
