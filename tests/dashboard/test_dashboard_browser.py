"""The dashboard in a real headless Chromium, as a clinician or privacy officer sees it.

The app is served on 127.0.0.1 from a thread; Chromium (driven by chromedriver through
Selenium) loads it, and the tests read what is on the screen: chart titles, the last
round's numbers, the verification verdict, the statistics table. Then a round is appended
to the ledger and the page must show it without being reloaded. Every request the browser
made is checked to have gone to 127.0.0.1 (the page must work without internet access).

Without Chromium, chromedriver or Selenium the tests skip, except under CI (``CI`` set),
where they fail: CI must run them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from dashboard_testlib import LedgerBuilder
from werkzeug.serving import WSGIRequestHandler, make_server

from dashboard.app import create_app
from secagg.crypto import Verifier

pytestmark = pytest.mark.timeout(300)

SCREENSHOT = Path(os.environ.get("DASHBOARD_SCREENSHOT", "/tmp/dashboard.png"))


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser test must run in CI)")
    pytest.skip(reason)


def _find(name: str, fallback: str) -> str | None:
    found = shutil.which(name)
    return found or (fallback if os.access(fallback, os.X_OK) else None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install selenium)")
    chromium = _find("chromium", "/usr/bin/chromium")
    driver_path = _find("chromedriver", "/usr/bin/chromedriver")
    if chromium is None or driver_path is None:
        _missing("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
    assert chromium is not None
    assert driver_path is not None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="dashboard-chromium-")
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1300,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    # The performance log lists every network request the page makes.
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


class QuietHandler(WSGIRequestHandler):
    """No access log: the page polls several times a second."""

    def log_request(self, *_args: Any) -> None:
        pass


@pytest.fixture
def serve(browser: Any) -> Iterator[Callable[..., str]]:
    """Start the app on 127.0.0.1; afterwards the browser leaves the page before the server
    stops (a page still polling a stopped server would log errors into the next test), and
    the browser's logs are emptied."""
    servers: list[Any] = []

    def start(ledger_url: str, verifiers: dict[str, Verifier] | None = None, **kwargs: Any) -> str:
        app = create_app(ledger_url, verifiers=verifiers, **kwargs)
        server = make_server(
            "127.0.0.1", 0, app.server, threaded=True, request_handler=QuietHandler
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    browser.get("about:blank")
    browser.get_log("browser")
    browser.get_log("performance")
    for server in servers:
        server.shutdown()
        server.server_close()


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def wait_for(driver: Any, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        time.sleep(0.2)
    body = driver.find_element("tag name", "body").text
    pytest.fail(f"timed out waiting for {what}; the page shows:\n{body}")


def show(driver: Any, view: str, marker: str) -> None:
    """Pick a part of the page (the radio button of ``view``) and wait until the element
    ``marker`` (an id) of that part is drawn."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"#view input[value='{view}']").click()
    wait_for(driver, lambda: bool(driver.find_elements(By.ID, marker)), f"the {view} part")


def chart_titles(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [str(e.text) for e in driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .gtitle")]


def table_rows(driver: Any, table_id: str) -> list[list[str]]:
    from selenium.webdriver.common.by import By

    table = driver.find_element(By.ID, table_id)
    return [
        [str(cell.text) for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in table.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(str(message["params"]["request"]["url"]))
    return urls


def assert_only_local_requests(driver: Any) -> None:
    urls = requested_urls(driver)
    assert urls, "the performance log recorded no request"
    network = [url for url in urls if urlsplit(url).scheme in ("http", "https", "ws", "wss")]
    assert network, urls
    for url in network:
        assert urlsplit(url).hostname == "127.0.0.1", f"the browser fetched {url}"


def assert_no_console_errors(driver: Any) -> None:
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def screenshot(driver: Any, path: Path) -> None:
    height = int(driver.execute_script("return document.body.scrollHeight"))
    driver.set_window_size(1300, min(height + 120, 8000))
    time.sleep(0.5)  # let Plotly resize the charts to the new window
    driver.save_screenshot(str(path))
    driver.set_window_size(1300, 1000)


# --------------------------------------------------------------------------- tests


def test_page_shows_the_agreed_rounds_and_follows_new_ones(
    browser: Any, serve: Callable[..., str], tmp_path: Path
) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=3, threshold=2, privacy={"epsilon": 2.0})
    builder.agree_round("s1", 1, {"accuracy": 0.812, "loss": 0.52, "auc": 0.861})
    builder.agree_round("s1", 2, {"accuracy": 0.874, "loss": 0.41, "auc": 0.902}, failed_attempts=1)
    builder.add_statistics(
        "cohort-malignant", "s1", 2, {"count": "diagnosis = M"}, {"count": 212}, 0.5
    )
    url = serve(builder.url, builder.verifiers(), interval_s=0.5)

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(url)
    wait_for(browser, lambda: "Ledger verified" in text_of(browser, "verdict"), "the verdict")
    # At load only the global model's part is drawn; each other part when picked.
    wait_for(browser, lambda: len(chart_titles(browser)) >= 2, "the charts")
    assert {"Global model quality", "Global loss"} <= set(chart_titles(browser))
    assert not browser.find_elements(By.ID, "privacy-table")
    # Keyboard: the parts are native radio buttons, the arrow keys pick the next one.
    browser.find_element(By.CSS_SELECTOR, "#view input[value='metrics']").send_keys(
        Keys.ARROW_RIGHT
    )
    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "privacy-table")), "privacy")
    wait_for(browser, lambda: len(chart_titles(browser)) >= 2, "the privacy charts")
    assert {"ε spent per round, by hospital", "Cumulative ε against budget"} <= set(
        chart_titles(browser)
    )
    assert not browser.find_elements(By.ID, "metrics-table")  # not drawn while hidden
    privacy = table_rows(browser, "privacy-table")
    assert privacy[-1] == ["2", "hospital-c", "0.250", "0.500", "2.000", "1.500"]
    show(browser, "stats", "stats-table")
    assert table_rows(browser, "stats-table")[0][:5] == [
        "cohort-malignant",
        "2",
        '{"count": "diagnosis = M"}',
        '{"count": 212}',
        "0.500",
    ]
    show(browser, "trust", "trust-table")
    assert table_rows(browser, "trust-table")[-1][:4] == [
        "2",
        "3 of 3",
        "2",
        "hospital-a, hospital-b, hospital-c",
    ]
    show(browser, "participation", "participation-table")
    wait_for(browser, lambda: len(chart_titles(browser)) >= 2, "the participation charts")
    assert {"Hospitals contributing per round", "Round duration"} <= set(chart_titles(browser))
    participation = table_rows(browser, "participation-table")
    assert participation[1][:5] == ["2", "agreed", "2", "hospital-b", "3 of 3"]
    show(browser, "metrics", "metrics-table")
    assert "0.874" in text_of(browser, "card-accuracy")
    assert "latest model, after round 2" in text_of(browser, "card-accuracy")
    assert text_of(browser, "card-signatures").endswith("3 of 3")
    assert text_of(browser, "card-rounds").endswith("2 of 3")
    assert "hash chain intact and every signature valid" in text_of(browser, "verdict")
    assert table_rows(browser, "metrics-table")[-1] == [
        "2",
        "2",
        "0.874",
        "0.902",
        "0.41",
        "agreed",
    ]

    # A new round, with hospital-c dropped out, must appear without reloading the page,
    # in the part being shown.
    show(browser, "participation", "participation-table")
    browser.execute_script("window.__notReloaded = true;")
    builder.agree_round(
        "s1",
        3,
        {"accuracy": 0.913, "loss": 0.33, "auc": 0.95},
        survivors=["hospital-a", "hospital-b"],
        epsilon={"hospital-a": 0.25, "hospital-b": 0.25},
    )
    wait_for(browser, lambda: "0.913" in text_of(browser, "card-accuracy"), "round 3")
    assert "final model, after round 3" in text_of(browser, "card-accuracy")
    assert browser.execute_script("return window.__notReloaded === true;")
    assert text_of(browser, "card-signatures") == "Signatures, round 3\n2 of 3"
    assert text_of(browser, "card-rounds").endswith("3 of 3")
    wait_for(browser, lambda: "3 agreed record(s)" in text_of(browser, "verdict"), "re-check")
    wait_for(browser, lambda: len(table_rows(browser, "participation-table")) == 3, "row 3")
    last = table_rows(browser, "participation-table")[-1]
    assert last[:6] == ["3", "agreed", "1", "hospital-c", "2 of 3", "hospital-c (at masked)"]

    screenshot(browser, SCREENSHOT)
    assert_only_local_requests(browser)
    assert_no_console_errors(browser)


def test_empty_ledger_and_session_selector(
    browser: Any, serve: Callable[..., str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    builder = LedgerBuilder.create(tmp_path)
    url = serve(builder.url, interval_s=0.5)
    browser.get(url)
    wait_for(browser, lambda: "no session yet" in text_of(browser, "session-facts"), "empty")
    assert "Signatures counted but not verified: no roster given" in text_of(browser, "verdict")

    builder.add_session("first", rounds=2)
    builder.agree_round("first", 1, {"accuracy": 0.7})
    wait_for(browser, lambda: "0.7" in text_of(browser, "card-accuracy"), "the first session")
    assert "first — running, 1 of 2 rounds agreed" in text_of(browser, "session")

    # A new session joins the selector; the page stays on the one being watched.
    builder.add_session("second", rounds=2)
    browser.find_element(By.ID, "session").click()
    wait_for(
        browser,
        lambda: any(
            "second — accepted, 0 of 2 rounds agreed" in e.text
            for e in browser.find_elements(By.CSS_SELECTOR, "[role=option]")
        ),
        "the second session in the selector",
    )
    assert "first —" in text_of(browser, "session")
    option = next(
        e for e in browser.find_elements(By.CSS_SELECTOR, "[role=option]") if "second" in e.text
    )
    option.click()
    wait_for(browser, lambda: "second —" in text_of(browser, "session"), "the second session")
    wait_for(browser, lambda: "No rounds agreed yet" in text_of(browser, "metrics"), "no rounds")
    assert text_of(browser, "card-rounds").endswith("0 of 2")
    assert_only_local_requests(browser)


def test_an_acceptance_signed_in_another_hospitals_name_shows_as_not_verifying(
    browser: Any, serve: Callable[..., str], tmp_path: Path
) -> None:
    """The attack: hospital-a signs hospital-c's acceptance of the proposal with its own key.
    With the roster, the page names hospital-c's acceptance as not verifying, in red."""
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=2)
    builder.accept("s1", forged_by="hospital-a")
    builder.agree_round("s1", 1, {"accuracy": 0.8})
    url = serve(builder.url, builder.verifiers(), interval_s=0.5)
    browser.get(url)
    # The forged acceptance fails the ledger check, as in verify-ledger: a red banner names it.
    wait_for(browser, lambda: bool(browser.find_elements("id", "check-banner")), "the banner")
    banner = text_of(browser, "check-banner")
    assert "acceptance of the proposal by hospital-c: signature does not verify" in banner
    summary = browser.find_element("id", "acceptance-summary")
    assert "1 of 3: signature does NOT verify (hospital-c)" in summary.text
    assert "2 of 3: accepted: signature verified" in summary.text
    assert "bad-text" in str(summary.get_attribute("class"))
    show(browser, "trust", "acceptance-table")
    rows = table_rows(browser, "acceptance-table")
    assert [row[:2] for row in rows] == [
        ["hospital-a", "accepted: signature verified"],
        ["hospital-b", "accepted: signature verified"],
        ["hospital-c", "signature does NOT verify"],
    ]
    assert_no_console_errors(browser)


def test_a_long_table_pages_by_keyboard(
    browser: Any, serve: Callable[..., str], tmp_path: Path
) -> None:
    """27 privacy rows (9 rounds × 3 hospitals): the last 25 are shown, and "Earlier rows",
    reached with Tab and pressed with Enter, shows the first ones."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=9, privacy={"epsilon": 9.0})
    for round_ in range(1, 10):
        builder.agree_round("s1", round_, {"accuracy": 0.5 + round_ / 100})
    url = serve(builder.url, interval_s=60)
    browser.get(url)
    wait_for(browser, lambda: "Ledger intact" in text_of(browser, "verdict"), "the verdict")
    show(browser, "privacy", "privacy-table")
    rows = table_rows(browser, "privacy-table")
    assert len(rows) == 25
    assert rows[0][:2] == ["1", "hospital-c"]
    status = browser.find_element(By.CSS_SELECTOR, ".pager [aria-live]")
    assert status.text == "Rows 3–27 of 27"
    later, earlier = (
        browser.find_element(By.XPATH, f"//button[text()='{label}']")
        for label in ("Later rows", "Earlier rows")
    )
    assert not later.is_enabled()
    # Keyboard only: the table region, then the button, then Enter.
    browser.find_element(By.ID, "privacy-table").find_element(By.XPATH, "..").click()
    browser.switch_to.active_element.send_keys(Keys.TAB)
    assert browser.switch_to.active_element == earlier
    earlier.send_keys(Keys.ENTER)
    wait_for(browser, lambda: status.text == "Rows 1–25 of 27", "the first rows")
    rows = table_rows(browser, "privacy-table")
    assert rows[0][:2] == ["1", "hospital-a"]
    assert rows[-1][:2] == ["9", "hospital-a"]
    assert not earlier.is_enabled()
    assert later.is_enabled()
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_real_federation(browser: Any, serve: Callable[..., str], tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
    from network_harness import Network

    network = Network.create(tmp_path / "network", 3)
    try:
        statuses = network.run_session(network.proposal("s1", rounds=2))
        states = {peer: getattr(status, "state", repr(status)) for peer, status in statuses.items()}
        assert set(states.values()) == {"finished"}, network.logs()
    finally:
        network.stop()
    ledger = network.kit.kits["hospital-a"].directory / "ledger.db"
    verifiers = network.kit.federation.roster.verifiers()
    records = network.records("hospital-a", "s1")
    url = serve(str(ledger), verifiers, interval_s=1.0)

    browser.get(url)
    wait_for(browser, lambda: "Ledger verified" in text_of(browser, "verdict"), "the verdict")
    assert text_of(browser, "card-rounds").endswith("2 of 2")
    signed = len(records[-1].signatures)
    assert text_of(browser, "card-signatures").endswith(f"{signed} of 3")
    show(browser, "trust", "trust-table")
    trust = table_rows(browser, "trust-table")
    assert [row[0] for row in trust] == ["1", "2"]
    show(browser, "participation", "participation-table")
    participation = table_rows(browser, "participation-table")
    aggregators = [str(r.record.metrics["aggregator"]) for r in records]
    assert [row[3] for row in participation] == aggregators
    assert all(row[1] == "agreed" for row in participation)
    screenshot(browser, SCREENSHOT.with_name(SCREENSHOT.stem + "-federation.png"))
    assert_only_local_requests(browser)
    assert_no_console_errors(browser)


def test_metric_edited_under_a_running_dashboard_raises_the_banner(
    browser: Any, serve: Callable[..., str], tmp_path: Path
) -> None:
    """The issue's attack: the last round's accuracy changed from 0.938 to 0.998 directly in
    ledger.db while the dashboard (started without --roster/--ca) is showing it."""
    import sqlite3

    from selenium.webdriver.common.by import By

    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=3)
    builder.agree_round("s1", 1, {"accuracy": 0.812, "auc": 0.861})
    builder.agree_round("s1", 2, {"accuracy": 0.901, "auc": 0.93})
    builder.agree_round("s1", 3, {"accuracy": 0.938, "auc": 0.95})
    url = serve(builder.url, interval_s=0.5)
    browser.get(url)
    wait_for(browser, lambda: "Ledger intact" in text_of(browser, "verdict"), "the keyless check")
    assert "0.938" in text_of(browser, "card-accuracy")
    assert not browser.find_elements(By.ID, "check-banner")

    with sqlite3.connect(builder.path) as db:
        (metrics,) = db.execute("SELECT metrics FROM agreed_records WHERE round = 3").fetchone()
        edited = json.loads(metrics)
        edited["accuracy"] = 0.998
        db.execute(
            "UPDATE agreed_records SET metrics = ? WHERE round = 3",
            (json.dumps(edited, sort_keys=True, separators=(",", ":")),),
        )

    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "check-banner")), "the banner")
    banner = text_of(browser, "check-banner")
    assert "Ledger check FAILED at round 3 of session s1" in banner
    assert "metrics_hash" in banner
    # The tampered value is never shown as agreed: not in the headline, greyed in charts.
    card = text_of(browser, "card-accuracy")
    assert "NOT AGREED" in card
    assert "0.998" not in card
    assert "FAILED" in text_of(browser, "card-check")
    assert table_rows(browser, "metrics-table")[-1][-1] == "not agreed (ledger check failed)"
    assert table_rows(browser, "metrics-table")[1][-1] == "agreed"
    legend = [
        str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#quality-chart .legendtext")
    ]
    assert "Not agreed: ledger check failed" in legend
    screenshot(browser, SCREENSHOT.with_name(SCREENSHOT.stem + "-tampered.png"))
    assert_only_local_requests(browser)
    assert_no_console_errors(browser)


def test_two_sessions_side_by_side(browser: Any, serve: Callable[..., str], tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("eps-1", rounds=2, privacy={"epsilon": 1.0})
    builder.agree_round("eps-1", 1, {"accuracy": 0.70, "auc": 0.75})
    builder.agree_round("eps-1", 2, {"accuracy": 0.80, "auc": 0.85})
    builder.add_session("eps-3", rounds=2, privacy={"epsilon": 3.0})
    builder.agree_round("eps-3", 1, {"accuracy": 0.78, "auc": 0.80})
    builder.agree_round("eps-3", 2, {"accuracy": 0.90, "auc": 0.93})
    url = serve(builder.url, interval_s=0.5)
    browser.get(url)
    wait_for(browser, lambda: "eps-3 —" in text_of(browser, "session"), "the newest session")
    browser.find_element(By.CSS_SELECTOR, "#view input[value='compare']").click()
    wait_for(browser, lambda: "Pick a second session" in text_of(browser, "compare-body"), "hint")
    browser.find_element(By.ID, "compare").click()
    option = next(
        e for e in browser.find_elements(By.CSS_SELECTOR, "[role=option]") if "eps-1" in e.text
    )
    option.click()
    wait_for(browser, lambda: bool(browser.find_elements(By.ID, "compare-table")), "comparison")
    rows = table_rows(browser, "compare-table")
    assert rows[0] == ["Model after round", "2", "2", "—"]
    assert rows[1] == ["Accuracy", "0.9", "0.8", "-0.1"]
    headers = [
        str(e.text) for e in browser.find_elements(By.CSS_SELECTOR, "#compare-table thead th")
    ]
    assert headers == ["Final model", "eps-3", "eps-1", "eps-1 − eps-3"]
    assert "Accuracy: sessions compared" in chart_titles(browser)
    # Tables are keyboard-reachable regions named by their caption.
    wrap = browser.find_element(By.ID, "compare-table").find_element(By.XPATH, "..")
    assert wrap.get_attribute("tabindex") == "0"
    assert wrap.get_attribute("aria-label").startswith("Final (latest evaluated) model")
    wrap.click()
    assert browser.switch_to.active_element == wrap
    assert_no_console_errors(browser)
