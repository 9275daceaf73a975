"""The dashboard's ledger check is ``peer verify-ledger``'s (peer/ledger_check.py), and it
stays whole when it only checks what was appended.

The attacks, each on a ledger as a peer keeps it, read through the dashboard's data layer
(:class:`~dashboard.source.LedgerSource` and :func:`~dashboard.app.render`):

* a stored round's parameters edited (the evidence of a round run under another threshold
  or collusion bound than the hospitals accepted), with and without keys;
* a stored round's evidence (its succinct transcript) edited, with the roster;
* an older record, or an older checkpoint, edited at the moment a new round is appended
  while the dashboard runs (the incremental check must not miss it).

A round agreed without stored evidence is a warning, shown on the page, never a failure.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

from dashboard_testlib import EvidenceLedger, LedgerBuilder

from dashboard.app import render
from dashboard.data import banner
from dashboard.source import LedgerSource
from peer.ledger import LedgerReport, ProblemKind
from peer.ledger_check import LedgerCheck
from secagg.crypto import Verifier

SESSION = EvidenceLedger.SESSION


def _evidence_ledger(tmp_path: Path, rounds: int = 3) -> EvidenceLedger:
    study = EvidenceLedger(tmp_path)
    study.accept()
    for round_ in range(1, rounds + 1):
        study.agree(round_)
    return study


def _verify_ledgers(study: EvidenceLedger | LedgerBuilder) -> LedgerReport:
    """What ``peer verify-ledger`` reports (check_ledger runs a fresh LedgerCheck)."""
    with study.open() as ledger:
        return LedgerCheck(study.verifiers()).run(ledger)


def _failed_round(source: LedgerSource, session_id: str) -> tuple[LedgerReport, str]:
    snapshot = source.snapshot(session_id)
    assert snapshot.report is not None, snapshot.check_error
    assert not snapshot.report.ok
    text = banner(snapshot.report, session_id, snapshot.records)
    assert text is not None
    # The page shows the same banner at the top (the first part rendered).
    assert text in str(render(snapshot)[0])
    return snapshot.report, text


def _edit_config(path: Path, round_: int, **fields: object) -> None:
    with sqlite3.connect(path) as db:
        (text,) = db.execute(
            "SELECT config FROM round_proofs WHERE round = ?", (round_,)
        ).fetchone()
        config = json.loads(text)
        config.update(fields)
        db.execute(
            "UPDATE round_proofs SET config = ? WHERE round = ?", (json.dumps(config), round_)
        )


def test_an_honest_ledger_with_evidence_is_verified_as_verify_ledger_says(tmp_path: Path) -> None:
    study = _evidence_ledger(tmp_path)
    source = LedgerSource(study.url, verifiers=study.verifiers())
    try:
        snapshot = source.snapshot(SESSION)
    finally:
        source.close()
    assert snapshot.report is not None
    assert snapshot.report.ok, snapshot.report
    assert snapshot.report.warnings == ()
    expected = _verify_ledgers(study)
    assert (snapshot.report.problems, snapshot.report.warnings) == (
        expected.problems,
        expected.warnings,
    )


def test_edited_round_parameters_fail_the_dashboard_check_naming_the_round(
    tmp_path: Path,
) -> None:
    # The attack: round 2's evidence says it ran with a collusion bound of 0 (a lower
    # consistency quorum) where the hospitals accepted 1. The record itself is untouched.
    study = _evidence_ledger(tmp_path)
    _edit_config(study.path, 2, colluders=0)
    for verifiers in (study.verifiers(), None):  # with the roster and without keys
        source = LedgerSource(study.url, verifiers=verifiers)
        try:
            report, text = _failed_round(source, SESSION)
        finally:
            source.close()
        kinds = {(p.kind, p.round) for p in report.problems}
        assert (ProblemKind.ROUND_PARAMETERS, 2) in kinds, report
        assert f"Ledger check FAILED at round 2 of session {SESSION}" in text
        # With the roster the succinct re-check also fails (the parameters are signed);
        # without keys the parameter check alone finds it.
        assert "colluders 0 (the proposal fixes 1)" in str(report)
    # The same problem verify-ledger reports.
    assert (ProblemKind.ROUND_PARAMETERS, 2) in {
        (p.kind, p.round) for p in _verify_ledgers(study).problems
    }


def test_edited_round_evidence_fails_the_dashboard_check_naming_the_round(tmp_path: Path) -> None:
    # The attack: round 3's stored transcript altered (one byte of the aggregator's
    # statement or the survivors' answers), e.g. to back another aggregate.
    study = _evidence_ledger(tmp_path)
    with sqlite3.connect(study.path) as db:
        (transcript,) = db.execute("SELECT transcript FROM round_proofs WHERE round = 3").fetchone()
        edited = bytearray(transcript)
        edited[len(edited) // 2] ^= 0x01
        db.execute("UPDATE round_proofs SET transcript = ? WHERE round = 3", (bytes(edited),))
    source = LedgerSource(study.url, verifiers=study.verifiers())
    try:
        report, text = _failed_round(source, SESSION)
    finally:
        source.close()
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.ROUND_PROOF, 3)]
    assert f"Ledger check FAILED at round 3 of session {SESSION}" in text
    assert [str(p) for p in report.problems] == [str(p) for p in _verify_ledgers(study).problems]


def test_evidence_edited_under_a_running_dashboard_is_found_at_the_periodic_recheck(
    tmp_path: Path,
) -> None:
    """Evidence is not read at every refresh (it can be large): an edit that leaves every
    record as it was is found within ``recheck_s``, like an edited checkpoint."""
    study = _evidence_ledger(tmp_path)
    now = [0.0]
    source = LedgerSource(
        study.url, verifiers=study.verifiers(), recheck_s=60, monotonic=lambda: now[0]
    )
    try:
        first = source.snapshot(SESSION).report
        assert first is not None
        assert first.ok
        _edit_config(study.path, 1, bits=64)
        now[0] = 61.0
        report, text = _failed_round(source, SESSION)
    finally:
        source.close()
    assert (ProblemKind.ROUND_PARAMETERS, 1) in {(p.kind, p.round) for p in report.problems}
    assert "bits 64 (the proposal fixes 32)" in str(report)
    assert f"Ledger check FAILED at round 1 of session {SESSION}" in text


def test_a_round_without_evidence_is_a_warning_shown_on_the_page_not_a_failure(
    tmp_path: Path,
) -> None:
    study = _evidence_ledger(tmp_path, rounds=1)
    study.agree(2, evidence=False)  # e.g. agreed before evidence was kept
    source = LedgerSource(study.url, verifiers=study.verifiers())
    try:
        snapshot = source.snapshot(SESSION)
    finally:
        source.close()
    assert snapshot.report is not None
    assert snapshot.report.ok
    (warning,) = snapshot.report.warnings
    assert (warning.kind, warning.round) == (ProblemKind.NOT_RECHECKABLE, 2)
    sections = render(snapshot)
    assert banner(snapshot.report, SESSION, snapshot.records) is None
    summary, trust = str(sections[2]), str(sections[6])
    assert "Ledger verified" in summary
    assert "1 warning(s), not re-checkable" in summary
    assert f"session '{SESSION}' round 2: no stored evidence" in summary
    assert "no stored evidence" in trust


# --------------------------------------------------------------------------- incremental


class _CountingVerifier:
    """A roster key that counts the signatures it is asked to verify."""

    def __init__(self, key: Verifier, counter: list[int]) -> None:
        self._key, self._counter = key, counter

    def verify(self, signature: bytes, data: bytes) -> bool:
        self._counter[0] += 1
        return self._key.verify(signature, data)


def _counting(builder: LedgerBuilder) -> tuple[dict[str, Verifier], list[int]]:
    counter = [0]
    verifiers: dict[str, Verifier] = {
        peer: _CountingVerifier(key, counter) for peer, key in builder.verifiers().items()
    }
    return verifiers, counter


def _four_rounds(tmp_path: Path) -> LedgerBuilder:
    builder = LedgerBuilder.create(tmp_path)
    builder.add_session("s1", rounds=6)
    builder.accept("s1")
    for round_ in range(1, 5):
        builder.agree_round("s1", round_, {"accuracy": 0.8 + round_ / 100})
    return builder


def _same_as_a_fresh_check(report: LedgerReport | None, builder: LedgerBuilder) -> None:
    assert report is not None
    fresh = _verify_ledgers(builder)
    assert (report.records, report.checkpoints) == (fresh.records, fresh.checkpoints)
    assert [str(p) for p in report.problems] == [str(p) for p in fresh.problems]
    assert [str(w) for w in report.warnings] == [str(w) for w in fresh.warnings]


def test_after_an_append_only_the_new_record_is_checked_and_the_report_is_whole(
    tmp_path: Path,
) -> None:
    builder = _four_rounds(tmp_path)
    verifiers, verified = _counting(builder)
    source = LedgerSource(builder.url, verifiers=verifiers, recheck_s=3600)
    try:
        assert source.snapshot("s1").report is not None
        before = verified[0]
        builder.agree_round("s1", 5, {"accuracy": 0.9})
        report = source.snapshot("s1").report
    finally:
        source.close()
    # The new record's 3 signatures, nothing of the 4 records checked before.
    assert verified[0] - before == 3
    assert report is not None
    assert report.ok
    assert report.records == 5
    _same_as_a_fresh_check(report, builder)


def test_an_older_record_edited_when_a_round_is_appended_is_still_found(tmp_path: Path) -> None:
    # The attack on the incremental check: edit round 2's accuracy (the metrics hash no
    # longer matches) just as the peer appends round 5, hoping only round 5 is checked.
    builder = _four_rounds(tmp_path)
    source = LedgerSource(builder.url, verifiers=builder.verifiers(), recheck_s=3600)
    try:
        first = source.snapshot("s1").report
        assert first is not None
        assert first.ok
        builder.agree_round("s1", 5, {"accuracy": 0.9})
        with sqlite3.connect(builder.path) as db:
            db.execute(
                "UPDATE agreed_records SET metrics = replace(metrics, '0.82', '0.99') "
                "WHERE round = 2"
            )
        report, text = _failed_round(source, "s1")
    finally:
        source.close()
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.METRICS_HASH, 2)]
    assert "Ledger check FAILED at round 2 of session s1" in text
    _same_as_a_fresh_check(report, builder)


def test_a_signature_replaced_in_an_older_record_at_an_append_is_still_found(
    tmp_path: Path,
) -> None:
    # Signatures verified before are remembered: a replaced one is not the remembered one.
    builder = _four_rounds(tmp_path)
    source = LedgerSource(builder.url, verifiers=builder.verifiers(), recheck_s=3600)
    try:
        assert source.snapshot("s1").report is not None
        builder.agree_round("s1", 5, {"accuracy": 0.9})
        with sqlite3.connect(builder.path) as db:
            (seq,) = db.execute("SELECT seq FROM agreed_records WHERE round = 1").fetchone()
            db.execute(
                "UPDATE record_signatures SET signature = ? WHERE seq = ? AND peer_id = ?",
                (b"\x30" * 70, seq, builder.peers[1]),
            )
        report, _ = _failed_round(source, "s1")
    finally:
        source.close()
    assert [(p.kind, p.round, p.peers) for p in report.problems] == [
        (ProblemKind.BAD_SIGNATURE, 1, (builder.peers[1],))
    ]


def test_an_older_checkpoint_edited_at_an_append_is_found_at_the_periodic_recheck(
    tmp_path: Path,
) -> None:
    """Checkpoints are large: after an append only the new record's is read; every one is
    read again within ``recheck_s`` (as before this change, for an unchanged ledger)."""
    builder = _four_rounds(tmp_path)
    now = [0.0]
    clock: Callable[[], float] = lambda: now[0]  # noqa: E731
    source = LedgerSource(builder.url, verifiers=None, recheck_s=60, monotonic=clock)
    try:
        assert source.snapshot("s1").report is not None
        builder.agree_round("s1", 5, {"accuracy": 0.9})
        with sqlite3.connect(builder.path) as db:
            db.execute("UPDATE checkpoints SET weights = ? WHERE round = 2", (b"\0" * 128,))
        now[0] = 10.0
        report = source.snapshot("s1").report
        assert report is not None
        assert report.records == 5
        assert report.checkpoints == 5
        now[0] = 75.0  # 60 s after every checkpoint was last read (at 0)
        report, text = _failed_round(source, "s1")
    finally:
        source.close()
    assert [(p.kind, p.round) for p in report.problems] == [(ProblemKind.CHECKPOINT_HASH, 2)]
    assert "Ledger check FAILED at round 2 of session s1" in text
