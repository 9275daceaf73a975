"""Clock skew against the reachable roster peers (their ``Clock`` service, peer/tls/_clock.py).

Why the thresholds: TLS validity and the CRL's ``next_update`` are checked on each site's own
clock, and stage deadlines run for seconds to minutes. A few seconds of skew is harmless but
a sign that NTP is not working (WARN); beyond a minute, certificates issued or renewed just
now look "not yet valid" to this site and deadlines mean different things on both sides
(FAIL). A reading counts as beyond a threshold only if it is beyond it whatever the network
delay was (skew minus half the round trip), so a slow link never fails a site.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

import grpc

from peer.config import PeerConfig
from peer.doctor._report import Finding, Status
from peer.identity import Clock, Roster
from peer.tls import ClockReading, TLSFiles, measure_skew, peer_channel

SKEW_WARN_SECONDS = 5.0
SKEW_FAIL_SECONDS = 60.0

Result = ClockReading | str  # a reading, or why there is none


def check_skew(
    config: PeerConfig, roster: Roster, clock: Clock, timeout: float
) -> Iterator[Finding]:
    """One ``clock skew`` finding: the worst peer's skew, every reading in the message."""
    others = [e.peer_id for e in roster.peers if e.peer_id != config.peer_id and e.address]
    results = asyncio.run(_read_all(config, roster, others, clock, timeout))
    readings = {p: r for p, r in results.items() if isinstance(r, ClockReading)}
    if not readings:
        why = "; ".join(f"{p}: {r}" for p, r in results.items()) or "no other peer in the roster"
        yield Finding(
            "clock skew",
            Status.WARN,
            f"not measured: no roster peer answered ({why})",
            "run doctor again when other peers are up (see the peer checks below); keep NTP on",
        )
        return
    worst = max(readings, key=lambda p: abs(readings[p].skew) - readings[p].uncertainty)
    text = ", ".join(
        f"{p} {r.skew:+.3f} s ± {r.uncertainty:.3f}" for p, r in sorted(readings.items())
    )
    missing = sorted(set(results) - set(readings))
    if missing:
        text += f" (not measured: {', '.join(missing)})"
    reading = readings[worst]
    if reading.exceeds(SKEW_FAIL_SECONDS):
        status, limit = Status.FAIL, SKEW_FAIL_SECONDS
    elif reading.exceeds(SKEW_WARN_SECONDS):
        status, limit = Status.WARN, SKEW_WARN_SECONDS
    else:
        yield Finding("clock skew", Status.OK, f"within {SKEW_WARN_SECONDS:g} s: {text}")
        return
    yield Finding(
        "clock skew",
        status,
        f"{worst}'s clock differs from ours by {reading.skew:+.1f} s (over {limit:g} s): {text}",
        "synchronise this machine's clock (timedatectl set-ntp true, or chrony); if only "
        f"{worst} is off, tell its site",
    )


async def _read_all(
    config: PeerConfig, roster: Roster, peer_ids: Sequence[str], clock: Clock, timeout: float
) -> dict[str, Result]:
    results = await asyncio.gather(*(_read(config, roster, p, clock, timeout) for p in peer_ids))
    return dict(zip(peer_ids, results, strict=True))


async def _read(
    config: PeerConfig, roster: Roster, peer_id: str, clock: Clock, timeout: float
) -> Result:
    files = TLSFiles(config.cert, config.key, config.ca)
    try:
        async with peer_channel(roster, peer_id, files) as channel:
            return await measure_skew(channel, clock=clock, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
        if code is grpc.StatusCode.UNIMPLEMENTED:
            return "runs a version without the Clock service"
        return f"no answer ({code.name if code else 'error'})"
