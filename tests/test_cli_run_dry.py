"""``ceremony run --dry-run`` and the training sessions shown by ``--help`` and the README.

The examples of :mod:`peer.operator.session_examples` are the ones a newcomer copies: they
must load, pass every check a peer makes of a proposal, and be the same in the README.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

from peer.kit import LocalKit
from peer.operator.session_examples import (
    IMAGING_SESSION,
    SITE_DATA,
    TABULAR_SESSION,
    TRAINING_HELP,
)
from scripts.ceremony import main

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("hospital-a", "hospital-b", "hospital-c")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> LocalKit:
    return LocalKit.create(tmp_path_factory.mktemp("dry") / "federation", list(PEERS))


def federation_file(kit: LocalKit, example: str, path: Path, **replace: str) -> Path:
    """The example with this kit's operator files in its [operator] table."""
    cert, key, ca = kit.operator_files()
    operator = (
        f'[operator]\ncert = "{cert}"\nkey = "{key}"\nca = "{ca}"\n'
        f'roster = "{kit.federation.roster_path}"\n'
    )
    text = re.sub(r"\[operator\]\n(.*\n){4}", operator, example, count=1)
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return path


def test_dry_run_of_the_tabular_example_shows_model_data_and_epsilon(
    kit: LocalKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation_file(kit, TABULAR_SESSION, tmp_path / "federation.toml")
    code = main(["run", "--federation", str(path), "--dry-run", "--records", "hospital-a=450"])
    out = capsys.readouterr().out
    assert code == 0, out
    # the ring and the rounds followed from the payload
    assert "5 rounds, 3 participants" in out
    assert "ring 64 bits" in out
    assert "model: mlp, 513 parameters" in out  # 30*16 + 16 + 16 + 1
    assert "task: binary" in out
    assert "data: 30 features per record" in out
    eps = re.search(r"hospital-a\s+450 training records\s+epsilon ([0-9.]+)", out)
    assert eps is not None, out
    assert 0 < float(eps.group(1)) < 50
    # the sites whose records were not given: a table by size, smaller sites spend more
    row = re.search(r"epsilon\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", out)
    assert row is not None, out
    values = [float(v) for v in row.groups()]
    assert values == sorted(values, reverse=True)
    assert "nothing was proposed" in out


def test_dry_run_of_the_imaging_example(
    kit: LocalKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation_file(kit, IMAGING_SESSION, tmp_path / "imaging.toml")
    assert main(["run", "--federation", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model: cnn, 1,571 parameters" in out, out
    assert "data: 32x32x1 images (max_value)" in out


def test_dry_run_refuses_what_every_peer_would_refuse(
    kit: LocalKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = federation_file(
        kit,
        TABULAR_SESSION,
        tmp_path / "bits.toml",
        **{"# rounds = 5 and bits = 64": "bits = 32\n#"},
    )
    assert main(["run", "--federation", str(path), "--dry-run"]) == 1
    assert "write bits = 64 in [session]" in capsys.readouterr().err


def test_a_declared_model_file_is_read_by_the_operator(
    kit: LocalKit, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    model = keras.Sequential(
        [keras.Input(shape=(30,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1)]
    )
    (tmp_path / "model.json").write_text(model.to_json(), encoding="utf-8")
    path = federation_file(
        kit,
        TABULAR_SESSION,
        tmp_path / "declared.toml",
        **{'model = "mlp"': 'model_file = "model.json"', "hidden = [16]": ""},
    )
    assert main(["run", "--federation", str(path), "--dry-run"]) == 0
    assert "model: declared, 129 parameters" in capsys.readouterr().out


def test_help_and_readme_show_the_same_complete_training_sessions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with contextlib.suppress(SystemExit):  # argparse exits after printing the help
        main(["run", "--help"])
    shown = capsys.readouterr().out
    for line in TRAINING_HELP.splitlines():
        assert line.strip() in shown
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for example in (TABULAR_SESSION, IMAGING_SESSION, SITE_DATA):
        assert example in readme
