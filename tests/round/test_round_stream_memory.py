"""The aggregator's end of a round stream keeps no delivered message while it waits.

Issue 11: the aggregator sums masked inputs as they arrive and holds O(m) words whatever n.
A stream that kept its last message (a masked input) until its next one arrives, a stage
later, held one vector per participant: O(n·m) again (measured: aggregator peak RSS grew
by ~2 vectors per peer in ``bench scale``).
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from peer.codec import fragments
from peer.round import serve_round_stream
from peer.wire import peer_pb2 as pb
from secagg import MaskedInput

CALLER = "hospital-a"


class _Round:
    """Stands in for AggregatorRound: remembers weakly what it was delivered."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object | None] = asyncio.Queue()
        self.delivered: list[weakref.ref[Any]] = []

    def join(self, hello: pb.RoundHello) -> asyncio.Queue[object | None]:
        return self.queue

    def deliver(self, peer: str, message: object) -> None:
        assert isinstance(message, MaskedInput)
        self.delivered.append(weakref.ref(message.vector))

    def leave(self, peer: str) -> None:
        pass

    def reject(self, peer: str, reason: str) -> None:
        raise AssertionError(f"rejected: {reason}")


async def _scenario() -> bool:
    requests: asyncio.Queue[pb.Fragment | None] = asyncio.Queue()

    async def incoming() -> AsyncIterator[pb.Fragment]:
        while (fragment := await requests.get()) is not None:
            yield fragment

    round_ = _Round()

    async def find(hello: pb.RoundHello) -> Any:
        return round_

    # Larger than one fragment: the reassembler's multi-fragment path, as for real vectors.
    vector = np.arange(600_000, dtype=np.uint32)
    masked = MaskedInput(CALLER, "s", 1, ("hospital-b",), vector, b"sig")
    for fragment in fragments(pb.RoundHello(peer_id=CALLER)):
        requests.put_nowait(fragment)
    for fragment in fragments(masked):
        requests.put_nowait(fragment)
    del masked, vector
    stream = serve_round_stream(incoming(), CALLER, find, 1 << 24)
    answer = asyncio.ensure_future(anext(stream, None))
    for _ in range(500):
        if round_.delivered:
            break
        await asyncio.sleep(0.01)
    assert round_.delivered, "the masked input was never delivered"
    # The stream now waits for the participant's next message (the next stage).
    gc.collect()
    released = round_.delivered[0]() is None
    round_.queue.put_nowait(None)
    requests.put_nowait(None)
    assert await answer is None
    return released


def test_a_stream_waiting_for_its_next_message_holds_no_delivered_vector() -> None:
    assert asyncio.run(_scenario())
