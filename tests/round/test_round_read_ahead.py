"""What grpc buffers for an aggregator that is busy does not grow with the vector (issue 11).

An aggregator's event loop sums one masked input at a time; meanwhile every other
participant keeps sending. With grpc's default flow control (BDP probing) each stream's
window grew until a participant's whole vector sat in the aggregator's grpc buffers: one
vector per peer, invisible to tracemalloc (measured 4.1 MiB of resident memory per stream of
4 MiB sent). The peer's server options fix the read-ahead (peer/tls/_channel.py). This test
runs a server with those options in a fresh process (memory_probe.py says why) and
participants in another (so that only the server's memory is counted), lets each send 4 MiB
to a handler that does not read yet, and checks the server's resident memory. While handlers
read, the bound is the fragment size instead (tests/round/test_round_read_ahead_tls.py).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
from memory_probe import MIB, child, exited, measured_in_a_fresh_process, rss, stream_server

STREAMS = 8
MESSAGES, MESSAGE_BYTES = 4, 1 << 20

# Run in a child process: STREAMS calls, each writing MESSAGES messages, then reading the answer.
_CLIENT = f"""
import asyncio, sys, grpc
async def main(port):
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{{port}}")
    payload = bytes({MESSAGE_BYTES})
    async def one():
        call = channel.stream_stream("/m11.Test/Stream", None, None)(None)
        for _ in range({MESSAGES}):
            await call.write(payload)
        await call.done_writing()
        await call.read()
    await asyncio.gather(*(one() for _ in range({STREAMS})))
asyncio.run(main(int(sys.argv[1])))
"""


async def _held_while_busy() -> tuple[int, int]:
    """(resident bytes the server gained while its handlers did not read, messages read)."""
    busy = asyncio.Event()
    read = 0

    async def handler(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        nonlocal read
        await busy.wait()
        while (raw := await context.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
            read += 1
            del raw
        yield b""

    async with stream_server("m11.Test", handler) as port:
        before = rss()
        with child([sys.executable, "-c", _CLIENT, str(port)]) as client:
            await asyncio.sleep(3.0)  # the participants send what the transport lets them
            held = rss() - before
            busy.set()
            await exited(client)
    return held, read


def test_a_busy_aggregator_buffers_a_bounded_read_ahead_per_stream() -> None:
    held, read = measured_in_a_fresh_process(__file__)
    assert read == STREAMS * MESSAGES
    # Each stream sent 4 MiB; the read-ahead is 1 MiB (measured ~1 MiB per stream; 4.1 MiB
    # per stream with grpc's default BDP probing, i.e. 33 MiB here).
    assert held < STREAMS * 2 * MIB, f"{held / MIB:.1f} MiB held for {STREAMS} streams"


if __name__ == "__main__":  # the server's side, measured in a fresh process
    print(*asyncio.run(_held_while_busy()))
