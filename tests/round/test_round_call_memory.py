"""The aggregator's RoundStream reader keeps no received fragment while it waits (issue 11).

Every participant sends its masked input at the same time and then waits, a stage or more,
for the aggregator. grpc's request iterator keeps the last raw message it yielded until the
next one arrives (measured: 1 MiB per stream with 1 MiB messages), so an aggregator reading
with it held up to one fragment per participant: aggregator memory O(n) instead of O(m).
:func:`peer.round_call.received_fragments` reads with ``context.read()`` instead. This test
runs a real grpc aio server in process and counts, with tracemalloc, what n streams that sent
one large fragment each still hold once the server has read them all.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from typing import Any

import grpc

from peer.round_call import received_fragments
from peer.wire import peer_pb2 as pb

FRAGMENT_DATA = 1 << 20
METHOD = "/m11.Test/Stream"


async def _retained_after_reading(n: int) -> tuple[int, int]:
    """(bytes still traced once the server read one fragment from each of n waiting streams,
    fragments the server read)."""
    received = 0
    release = asyncio.Event()

    async def handler(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        nonlocal received
        async for fragment in received_fragments(context):
            assert len(fragment.data) == FRAGMENT_DATA
            received += 1
            del fragment
            # The participant now waits for the next stage; so does its stream.
        await release.wait()
        yield b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "m11.Test", {"Stream": grpc.stream_stream_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # One serialized fragment shared by every stream: the clients' side holds O(1) of it,
    # and what grows with n is the server's.
    payload = pb.Fragment(
        kind="masked", total_size=4 * FRAGMENT_DATA, data=bytes(FRAGMENT_DATA)
    ).SerializeToString()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    calls = [channel.stream_stream(METHOD, None, None)(None) for _ in range(n)]
    try:
        for call in calls:
            await call.write(payload)
        for _ in range(1000):
            if received == n:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        release.set()
        for call in calls:
            call.cancel()
        await channel.close(None)
        await server.stop(None)
    return retained, received


def test_streams_waiting_after_a_large_fragment_hold_no_copy_of_it() -> None:
    tracemalloc.start()
    try:
        few, few_received = asyncio.run(_retained_after_reading(2))
        many, many_received = asyncio.run(_retained_after_reading(8))
    finally:
        tracemalloc.stop()
    assert (few_received, many_received) == (2, 8)
    # Six more waiting streams: one kept fragment each would add 6 MiB.
    assert many - few < FRAGMENT_DATA, f"{(many - few) / FRAGMENT_DATA:.1f} MiB more for 6 streams"
