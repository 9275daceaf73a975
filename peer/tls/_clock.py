"""This peer's wall clock, served next to the health service, so sites can measure skew.

Certificates and the CRL are checked against each site's own clock and stage deadlines are
measured on it: a site whose clock is off by minutes refuses valid certificates (or accepts
expired ones) and times out rounds the others consider healthy. ``peer doctor`` asks every
reachable roster peer for its time (:func:`measure_skew`) the way NTP does, one exchange:

    t0 = our clock before the call, T = their clock, t1 = our clock after it
    skew = T - (t0 + t1) / 2          uncertainty = (t1 - t0) / 2

The answer travels in the same mTLS channel as everything else, so only roster members can
ask and answer, and the reading is as trustworthy as the peer that sends it: it is a
diagnostic, never an input to the protocol. Messages are protobuf's well-known
``Empty`` and ``Timestamp`` (no change to the project's wire format).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

__all__ = [
    "CLOCK_METHOD",
    "ClockReading",
    "WallClock",
    "clock_handler",
    "measure_skew",
    "system_now",
]

CLOCK_SERVICE = "hospital_secagg.v1.Clock"
CLOCK_METHOD = f"/{CLOCK_SERVICE}/Now"

WallClock = Callable[[], datetime]


def system_now() -> datetime:
    return datetime.now(UTC)


def clock_handler(wall_clock: WallClock = system_now) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The ``Clock.Now`` service answering ``wall_clock()`` (injected in tests)."""

    async def now(_request: empty_pb2.Empty, _context: Any) -> timestamp_pb2.Timestamp:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(wall_clock())
        return stamp

    return grpc.method_handlers_generic_handler(
        CLOCK_SERVICE,
        {
            "Now": grpc.unary_unary_rpc_method_handler(
                now,
                request_deserializer=empty_pb2.Empty.FromString,
                response_serializer=timestamp_pb2.Timestamp.SerializeToString,
            )
        },
    )


@dataclass(frozen=True)
class ClockReading:
    """One skew measurement: ``skew`` seconds (their clock minus ours), ± ``uncertainty``."""

    skew: float
    uncertainty: float

    def exceeds(self, limit: float) -> bool:
        """The skew is beyond ``limit`` even in the most favourable reading of the RTT."""
        return abs(self.skew) - self.uncertainty > limit


async def measure_skew(
    channel: grpc.aio.Channel, *, clock: WallClock, timeout: float
) -> ClockReading:
    """Ask the peer at the other end of ``channel`` for its time.

    Raises:
        grpc.RpcError: the call failed (an older peer answers UNIMPLEMENTED).
    """
    call = channel.unary_unary(
        CLOCK_METHOD,
        request_serializer=empty_pb2.Empty.SerializeToString,
        response_deserializer=timestamp_pb2.Timestamp.FromString,
    )
    before = clock()
    answer = await call(empty_pb2.Empty(), timeout=timeout)
    after = clock()
    theirs = answer.ToDatetime(tzinfo=UTC)
    midpoint = before + (after - before) / 2
    return ClockReading(
        skew=(theirs - midpoint).total_seconds(),
        uncertainty=(after - before).total_seconds() / 2,
    )
