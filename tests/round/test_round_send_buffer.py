"""What grpc buffers of the aggregator's large sends does not grow with the vector (issue 11).

After unmasking, the aggregator writes the same large messages (the statement carrying the
aggregate, then the transcript) to every participant's stream at once, while the
participants are still busy. grpc takes each written message off the handler before the
participant reads it and holds it in native memory (invisible to tracemalloc) until the
participant's window accepts it: in fragments of 1 MiB that was about half of a 4 MB vector
per stream (0.9 to 2.2 MiB per stream measured), i.e. O(n·m) at the aggregator. The
aggregator now sends in fragments of SEND_FRAGMENT_BYTES (peer/round/aggregating.py). This
test runs a server with the peer's options in a fresh process (memory_probe.py says why),
writing one shared encoded message of 4 MB (then 16 MB) to participants in another process
(one connection each, so that only the server's memory is counted) that do not read for a
while, and checks what the server's resident memory gains from the moment every participant
has said hello.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import grpc
import numpy as np
from memory_probe import MIB, child, exited, measured_in_a_fresh_process, rss, stream_server

from peer.round.aggregating import Encoded
from peer.wire import peer_pb2 as pb
from secagg.messages import MaskedInput

STREAMS = 8

# Run in a child process: STREAMS calls on their own connections; each says hello, then
# (a busy participant) reads nothing until a line arrives on stdin, then reads everything;
# prints the bytes read. Told, not timed: under a loaded CI machine a fixed wait ended
# inside the measurement, and the reads then counted as held memory (4.2 MiB once).
_CLIENT = f"""
import asyncio, sys, grpc
async def main(port):
    go = asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    async def one():
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{{port}}")
        call = channel.stream_stream("/m11.Send/Stream", None, None)(None)
        await call.write(b"hello")
        await asyncio.shield(go)
        size = 0
        while (raw := await call.read()) is not grpc.aio.EOF:
            size += len(raw)
        await channel.close()
        return size
    print(sum(await asyncio.gather(*(one() for _ in range({STREAMS})))))
asyncio.run(main(int(sys.argv[1])))
"""


async def _held_while_participants_are_busy(shared: Encoded) -> tuple[int, int]:
    """(the most resident bytes the server gained while nobody read, bytes read)."""

    hellos = 0
    everyone = asyncio.Event()
    send = asyncio.Event()

    async def handler(requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        nonlocal hellos
        await context.read()  # the hello
        hellos += 1
        if hellos == STREAMS:
            everyone.set()
        await send.wait()
        for fragment in shared.fragments:  # as serve_round_stream sends an Encoded message
            yield fragment

    serializer = pb.Fragment.SerializeToString
    async with stream_server("m11.Send", handler, response_serializer=serializer) as port:
        command = [sys.executable, "-c", _CLIENT, str(port)]
        with child(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as client:
            await asyncio.wait_for(everyone.wait(), 60)
            # Counted from here: what the connections, calls and handlers themselves cost
            # is not what the sends buffer (counted from before the connections, CI once
            # read 5.0 MiB "held"). The pause lets the last hello's own work settle.
            await asyncio.sleep(0.2)
            before = rss()
            send.set()
            # The handlers write what grpc lets them while nobody reads yet: the peak of that.
            held = 0
            for _ in range(60):
                held = max(held, rss() - before)
                await asyncio.sleep(0.05)
            assert client.stdin is not None
            client.stdin.write("read now\n")
            client.stdin.flush()
            await exited(client)
            out, _ = client.communicate(timeout=10)
    return held, int(out)


def _measure(length: int) -> tuple[int, int]:
    vector = np.arange(length, dtype=np.uint32)
    message = MaskedInput("hospital-a", "s", 1, ("hospital-b",), vector, b"sig")
    shared = Encoded.of(message)
    held, read = asyncio.run(_held_while_participants_are_busy(shared))
    assert read == STREAMS * sum(f.ByteSize() for f in shared.fragments)
    return held, read


def test_the_aggregators_large_sends_buffer_a_bounded_amount_per_stream() -> None:
    # m = 10^6 (4 MB, as in the issue) and 4·10^6: what grpc holds must not follow m.
    # Measured in fresh processes: 0.7-1.2 MiB for either, idle or beside 4 busy
    # processes on 2 cores, in an earlier stop; in this one 0.13 MiB at m = 10^6 and 1.2-1.3
    # MiB at 4·10^6 (3 runs each, idle, and once in `make test`), a gap of 1.1-1.2 MiB that
    # is far from the 8 x 12 MB = 96 MB more that the streams carry at 4·10^6.
    # With the 1 MiB fragments sent before: 0-6 MiB at m = 10^6 (0 when the kernel's socket
    # buffers take everything) and 17-19 MiB at m = 4·10^6, so this test fails when the
    # change is undone.
    held, read = measured_in_a_fresh_process(__file__, "1000000")
    held_4x, read_4x = measured_in_a_fresh_process(__file__, "4000000")
    assert read_4x > 3.9 * read
    for figure, length in ((held, "10^6"), (held_4x, "4·10^6")):
        assert figure < 3.5 * MIB, f"{figure / MIB:.1f} MiB held for {STREAMS} streams, m={length}"
    assert held_4x < held + 2 * MIB, (
        f"{held_4x / MIB:.1f} MiB held at m=4·10^6 against {held / MIB:.1f} MiB at m=10^6"
    )


if __name__ == "__main__":
    print(*_measure(int(sys.argv[1])))
