"""`ceremony` identity commands: init-ca, request, sign, roster, revoke, kit, and mistakes."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peer.config import load_config
from peer.identity import ca_info, current_crl, fingerprint, load_certificate, load_roster
from scripts.ceremony import main

ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "cardio"


def ceremony_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = main([*argv, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.strip().splitlines()
    assert len(lines) == 1, captured.out
    result: dict[str, Any] = json.loads(lines[0])
    return result


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """Run a command that must be refused: exit 2, one line on stderr, returned."""
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    ceremony_json(capsys, "init-ca", "--dir", str(tmp_path / "ca"), "--federation", FEDERATION)
    return tmp_path / "ca"


def request(
    capsys: pytest.CaptureFixture[str], site: Path, peer_id: str, *extra: str
) -> dict[str, Any]:
    return ceremony_json(
        capsys,
        "request",
        "--dir",
        str(site),
        "--peer-id",
        peer_id,
        "--institution",
        f"Institution {peer_id}",
        "--federation",
        FEDERATION,
        *extra,
    )


def sign(
    capsys: pytest.CaptureFixture[str], ca: Path, csr: str, out: Path, *extra: str
) -> dict[str, Any]:
    return ceremony_json(
        capsys, "sign", "--ca", str(ca), "--csr", csr, "--out", str(out), "--yes", *extra
    )


def test_init_ca_prints_the_fingerprint_of_the_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = ceremony_json(
        capsys, "init-ca", "--dir", str(tmp_path / "ca"), "--federation", "f1", "--name", "F1 CA"
    )
    info = ca_info(tmp_path / "ca")
    assert report["fingerprint"] == info.fingerprint == fingerprint(info.certificate)
    assert report["common_name"] == "F1 CA"
    assert stat.S_IMODE(info.key_path.stat().st_mode) == 0o600
    # A second init in the same folder must not replace the root key.
    err = fails(capsys, "init-ca", "--dir", str(tmp_path / "ca"), "--federation", "f1")
    assert "already holds a CA" in err


def test_whole_ceremony_to_a_startable_kit(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = {}
    for peer_id in ("hospital-a", "hospital-b"):
        site = tmp_path / peer_id
        made = request(capsys, site, peer_id, "--host", "localhost", "--ip", "127.0.0.1")
        assert made["key_mode"] == "0600"
        assert stat.S_IMODE(Path(made["key"]).stat().st_mode) == 0o600
        issued = sign(capsys, ca, made["csr"], site / f"{peer_id}.pem")
        # What the CA saw before signing is what the hospital asked for.
        assert issued["peer_id"] == peer_id
        assert issued["csr_fingerprint"] == made["csr_fingerprint"]
        assert issued["ca_fingerprint"] == ca_info(ca).fingerprint
        assert issued["dns"] == ["localhost"]
        certs[peer_id] = site / f"{peer_id}.pem"
    operator = request(capsys, tmp_path / "op", "operator-1", "--operator")
    sign(capsys, ca, operator["csr"], tmp_path / "op" / "operator-1.pem", "--operator")

    roster_path = tmp_path / "roster.json"
    roster = ceremony_json(
        capsys,
        "roster",
        "--ca",
        str(ca),
        "--peer",
        f"{certs['hospital-a']}=127.0.0.1:7001",
        f"{certs['hospital-b']}=127.0.0.1:7002",
        "--operator",
        str(tmp_path / "op" / "operator-1.pem"),
        "--out",
        str(roster_path),
    )
    assert [m["peer_id"] for m in roster["members"]] == ["hospital-a", "hospital-b", "operator-1"]
    loaded = load_roster(roster_path, load_certificate(ca / "ca.pem"))
    assert loaded["hospital-b"].address == "127.0.0.1:7002"

    # Kit with the hospital's own key (assembled on its machine) ...
    kit_a = tmp_path / "kit-a"
    report = ceremony_json(
        capsys,
        "kit",
        "--ca",
        str(ca),
        "--peer-cert",
        str(certs["hospital-a"]),
        "--address",
        "127.0.0.1:7001",
        "--roster",
        str(roster_path),
        "--out",
        str(kit_a),
        "--key",
        str(tmp_path / "hospital-a" / "hospital-a.key"),
    )
    assert report["key_present"] is True
    assert stat.S_IMODE((kit_a / "hospital-a.key").stat().st_mode) == 0o600
    assert set(report["files"]) >= {
        "hospital-a.toml",
        "hospital-a.pem",
        "hospital-a.key",
        "ca.pem",
        "roster.json",
        "roster.json.sig",
        "crl.pem",
        "ROOT_FINGERPRINT.txt",
    }
    assert ca_info(ca).fingerprint in (kit_a / "ROOT_FINGERPRINT.txt").read_text()
    config = load_config(kit_a / "hospital-a.toml")  # the peer would accept this config
    assert config.peer_id == "hospital-a"
    assert config.policy.allowed_operators == ("operator-1",)

    # ... and without: the CA never has it, and says so.
    main(
        [
            "kit",
            "--ca",
            str(ca),
            "--peer-cert",
            str(certs["hospital-b"]),
            "--address",
            "127.0.0.1:7002",
            "--roster",
            str(roster_path),
            "--out",
            str(tmp_path / "kit-b"),
        ]
    )
    out = capsys.readouterr().out
    assert "private key is NOT in this kit" in out
    assert not (tmp_path / "kit-b" / "hospital-b.key").exists()


def test_sign_refuses_a_csr_from_another_federation(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = ceremony_json(
        capsys,
        "request",
        "--dir",
        str(tmp_path / "x"),
        "--peer-id",
        "hospital-x",
        "--institution",
        "X",
        "--federation",
        "elsewhere",
    )
    err = fails(
        capsys, "sign", "--ca", str(ca), "--csr", made["csr"], "--out", str(tmp_path / "x.pem")
    )
    assert "federation 'elsewhere'" in err
    assert FEDERATION in err
    assert not (tmp_path / "x.pem").exists()


def test_sign_refuses_the_wrong_role(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = request(capsys, tmp_path / "op", "operator-1", "--operator")
    err = fails(
        capsys, "sign", "--ca", str(ca), "--csr", made["csr"], "--out", str(tmp_path / "o.pem")
    )
    assert "--operator" in err


MISTAKES = {
    "missing CSR": ("sign --ca {tmp}/ca --csr {tmp}/missing.csr --out {tmp}/x.pem", "missing.csr"),
    "not a CA": ("sign --ca {tmp}/nowhere --csr {tmp}/x.csr --out {tmp}/x.pem", "not a CA"),
    "no address": ("roster --ca {tmp}/ca --peer {tmp}/a.pem --out {tmp}/r.json", "HOST:PORT"),
    "missing cert": ("roster --ca {tmp}/ca --peer {tmp}/no.pem=h:1 --out {tmp}/r", "no.pem"),
    "revoke missing": ("revoke --ca {tmp}/ca --cert {tmp}/none.pem", "none.pem"),
    "bad peer id": (
        "request --dir {tmp}/s --peer-id Bad! --institution I --federation f",
        "Bad!",
    ),
    "no config": ("verify-ledger --config {tmp}/none.toml", "none.toml"),
    "bad address": (
        "kit --ca {tmp}/ca --peer-cert {tmp}/a.pem --address nohost --roster {tmp}/r.json "
        "--out {tmp}/k",
        "host:port",
    ),
}


@pytest.mark.parametrize("case", sorted(MISTAKES))
def test_user_mistakes_are_one_line_and_exit_2(
    tmp_path: Path,
    ca: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    command, expected = MISTAKES[case]
    err = fails(capsys, *command.format(tmp=tmp_path).split())
    assert expected in err


def test_kit_refuses_a_key_of_someone_else_and_writes_nothing(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = {p: request(capsys, tmp_path / p, p) for p in ("hospital-a", "hospital-b")}
    for peer_id, paths in made.items():
        sign(capsys, ca, paths["csr"], tmp_path / peer_id / f"{peer_id}.pem")
    ceremony_json(
        capsys,
        "roster",
        "--ca",
        str(ca),
        "--peer",
        f"{tmp_path}/hospital-a/hospital-a.pem=127.0.0.1:7001",
        "--out",
        str(tmp_path / "roster.json"),
    )
    base = ["kit", "--ca", str(ca), "--address", "127.0.0.1:7001"]
    base += ["--roster", str(tmp_path / "roster.json"), "--out", str(tmp_path / "kit")]
    err = fails(
        capsys,
        *base,
        "--peer-cert",
        f"{tmp_path}/hospital-a/hospital-a.pem",
        "--key",
        made["hospital-b"]["key"],
    )
    assert "is not the private key" in err
    assert not (tmp_path / "kit").exists()
    err = fails(capsys, *base, "--peer-cert", f"{tmp_path}/hospital-b/hospital-b.pem")
    assert "not in roster" in err


def test_revoke_publishes_a_new_crl(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = request(capsys, tmp_path / "a", "hospital-a")
    issued = sign(capsys, ca, made["csr"], tmp_path / "a" / "hospital-a.pem")
    report = ceremony_json(
        capsys,
        "revoke",
        "--ca",
        str(ca),
        "--cert",
        str(tmp_path / "a" / "hospital-a.pem"),
        "--reason",
        "key_compromise",
    )
    assert report["revoked_serials"] == [issued["serial"]]
    assert report["crl_number"] == 2
    assert current_crl(ca).revoked(int(issued["serial"], 16)) is not None
    err = fails(capsys, "revoke", "--ca", str(ca), "--cert", str(tmp_path / "a/hospital-a.pem"))
    assert "already revoked" in err


def test_the_console_entry_point_gives_one_line_errors(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.ceremony", "sign", "--ca", str(tmp_path), "--csr", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert "--out" in result.stderr  # argparse: the missing argument is named


@pytest.mark.parametrize(
    "command",
    ["init-ca", "request", "sign", "roster", "revoke", "kit", "verify-ledger", "run", "demo"],
)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    assert f"usage: ceremony {command}" in capsys.readouterr().out


def test_roster_lists_an_outbound_only_peer_without_an_address(
    tmp_path: Path, ca: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    made = {p: request(capsys, tmp_path / p, p) for p in ("hospital-a", "hospital-b")}
    for peer_id, paths in made.items():
        sign(capsys, ca, paths["csr"], tmp_path / peer_id / f"{peer_id}.pem")
    roster = ceremony_json(
        capsys,
        "roster",
        "--ca",
        str(ca),
        "--peer",
        f"{tmp_path}/hospital-a/hospital-a.pem=127.0.0.1:7001",
        "--outbound-only",
        f"{tmp_path}/hospital-b/hospital-b.pem",
        "--out",
        str(tmp_path / "roster.json"),
    )
    assert {m["peer_id"]: m["address"] for m in roster["members"]} == {
        "hospital-a": "127.0.0.1:7001",
        "hospital-b": None,
    }
    loaded = load_roster(tmp_path / "roster.json", load_certificate(ca / "ca.pem"))
    assert loaded["hospital-a"].inbound
    assert not loaded["hospital-b"].inbound
