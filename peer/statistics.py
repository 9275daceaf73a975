"""Moved to peer/payloads/statistics.py; this name stays for scripts/ceremony_stats.py."""

from peer.payloads.statistics import (
    STATISTICS_KIND as STATISTICS_KIND,  # moved to peer.payloads.statistics
)
from peer.payloads.statistics import (
    StatisticsSpec as StatisticsSpec,  # moved to peer.payloads.statistics
)
from peer.payloads.statistics import (
    StatisticsSpecError as StatisticsSpecError,  # moved to peer.payloads.statistics
)
