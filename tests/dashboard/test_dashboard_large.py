"""Long sessions: beyond BARS_UP_TO rounds the privacy charts draw one line per hospital
with a few markers, not a bar or a marker per round and hospital (what made a 1,000-round
page slow)."""

from __future__ import annotations

import pytest
from test_dashboard_data import PEERS, stored

from dashboard import figures
from dashboard.data import privacy_table


@pytest.mark.parametrize("rounds", [figures.BARS_UP_TO, figures.BARS_UP_TO + 1])
def test_privacy_charts_switch_to_lines_beyond_bars_up_to(rounds: int) -> None:
    records = [stored(r, {"accuracy": 0.5}) for r in range(1, rounds + 1)]
    table = privacy_table(records, dict.fromkeys(PEERS, 1000.0))
    per_round = figures.privacy_round_figure(table)
    cumulative = figures.privacy_cumulative_figure(table)
    assert per_round is not None
    assert cumulative is not None
    hospitals = [t for t in cumulative.data if t.name in PEERS]
    assert [t.name for t in per_round.data] == list(PEERS)
    assert [t.name for t in hospitals] == list(PEERS)
    long = rounds > figures.BARS_UP_TO
    assert all((t.type == "scatter") == long for t in per_round.data)
    # Long lines keep a few markers (shapes tell hospitals apart without colour), not one
    # per round and hospital.
    assert all((t.marker.maxdisplayed == figures.MARKERS_SHOWN) == long for t in hospitals)
    # The values are all still there: every round of every hospital.
    assert all(len(t.y) == rounds for t in [*per_round.data, *hospitals])
    assert list(hospitals[0].y)[-1] == pytest.approx(0.5 * rounds)
