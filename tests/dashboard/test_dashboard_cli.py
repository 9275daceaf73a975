"""The ``dashboard`` command line, and the app it serves as seen over HTTP (no browser)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from dashboard_testlib import LedgerBuilder

from dashboard.__main__ import main
from dashboard.app import create_app


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        sys.exit(main(list(args)))
    code = exited.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if not re.match(r"^\d{4}-\d\d-\d\d ", line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("dashboard: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.mark.parametrize(
    ("url", "fragments"),
    [
        ("notadb://somewhere", ("notadb",)),
        ("sqlite:////nonexistent/dir/ledger.db", ("no ledger file", "/nonexistent/dir")),
        ("/nonexistent/ledger.db", ("no ledger file",)),
        ("sqlite://", ("in-memory",)),
        ("postgresql+nosuchdriver://u@h/db", ("nosuchdriver",)),
    ],
)
def test_bad_ledger_url_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], url: str, fragments: tuple[str, ...]
) -> None:
    code, err = run_main(capsys, "--ledger", url)
    assert code == 2
    assert_one_line_error(err, *fragments)


def test_file_that_is_not_a_ledger(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database " * 100)
    code, err = run_main(capsys, "--ledger", str(text))
    assert code == 2
    assert_one_line_error(err, "not a database", str(text))
    empty = tmp_path / "empty.db"
    import sqlite3

    sqlite3.connect(empty).close()
    code, err = run_main(capsys, "--ledger", f"sqlite:///{empty}")
    assert code == 2
    assert_one_line_error(err, "holds no peer ledger")


def test_roster_problems(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    builder = LedgerBuilder.create(tmp_path)
    code, err = run_main(capsys, "--ledger", builder.url, "--roster", "r.json")
    assert code == 2
    assert_one_line_error(err, "--roster and --ca go together")
    roster = builder.federation.roster_path
    assert roster is not None
    code, err = run_main(
        capsys, "--ledger", builder.url, "--roster", str(roster), "--ca", str(tmp_path / "no.pem")
    )
    assert code == 2
    assert_one_line_error(err, "does not exist")
    # A roster checked against the wrong CA (here: a hospital certificate) is refused.
    wrong_ca = builder.federation.members["hospital-b"].cert
    code, err = run_main(
        capsys, "--ledger", builder.url, "--roster", str(roster), "--ca", str(wrong_ca)
    )
    assert code == 2
    assert_one_line_error(err, "roster")


@pytest.mark.parametrize(
    "args",
    [
        ("--budget", "hospital-a"),
        ("--budget", "hospital-a=lots"),
        ("--budget", "hospital-a=0"),
        ("--interval", "0"),
        ("--port", "70000"),
    ],
)
def test_bad_options_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: tuple[str, ...]
) -> None:
    builder = LedgerBuilder.create(tmp_path)
    code, err = run_main(capsys, "--ledger", builder.url, *args)
    assert code == 2
    assert "error" in err


def test_served_page_loads_nothing_from_outside(tmp_path: Path) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1")
    builder.agree_round("s1", 1, {"accuracy": 0.75})
    app = create_app(builder.url, interval_s=2.0)
    client = app.server.test_client()
    page = client.get("/")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    references = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html)
    assert any("dashboard.css" in ref for ref in references)
    assert any("dash_renderer" in ref for ref in references)
    for ref in references:
        assert ref.startswith("/"), ref
        assert not ref.startswith("//"), ref
        assert client.get(ref).status_code == 200, ref
    # Dash's config must not point the renderer at a CDN either.
    config = json.loads(re.search(r'id="_dash-config"[^>]*>(.*?)</script>', html, re.S)[1])  # type: ignore[index]
    assert config["serve_locally"] is True


def test_command_serves_the_ledger(tmp_path: Path) -> None:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1")
    builder.agree_round("s1", 1, {"accuracy": 0.75})
    roster = builder.federation.roster_path
    assert roster is not None
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dashboard",
            "--ledger",
            str(builder.path),
            "--port",
            "0",
            "--roster",
            str(roster),
            "--ca",
            str(builder.federation.ca.cert_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 60
        line = ""
        while "serving" not in line and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "dashboard exited before serving"
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert match, line
        assert "signatures verified against the roster" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{match[1]}/", timeout=10) as response:
            assert response.status == 200
            assert "Consortium ledger" in response.read().decode()
    finally:
        process.terminate()
        process.wait(timeout=10)
