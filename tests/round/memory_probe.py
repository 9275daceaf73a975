"""What the memory tests of a grpc server share (tests/round/test_round_read_ahead*.py,
test_round_send_buffer.py): the process's resident memory, a server with the peer's options
serving one stream-stream method, and the participants' child process.

grpc holds what it buffers in native memory, invisible to tracemalloc, so these tests read
the resident set size (RSS) of the process running the server, with the participants in a
child process so that only the server's memory is counted.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc

from peer.tls import SERVER_OPTIONS

MIB = 1 << 20


def rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def stream_server(
    service: str,
    handler: Callable[..., Any],
    *,
    credentials: grpc.ServerCredentials | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
) -> AsyncIterator[int]:
    """A started server with the peer's options (``SERVER_OPTIONS``) serving ``handler`` as
    the stream-stream method ``/<service>/Stream`` on 127.0.0.1, over TLS with
    ``credentials`` or else in plaintext. Yields its port; stopped on exit."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    method = grpc.stream_stream_rpc_method_handler(handler, response_serializer=response_serializer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service, {"Stream": method}),)
    )
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


@contextmanager
def child(args: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """The participants' process (``subprocess.Popen(args, **popen)``), killed on exit if
    it is still running."""
    process = subprocess.Popen(args, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()


async def exited(process: subprocess.Popen[Any]) -> None:
    """Wait up to 60 s for ``process`` to finish, then check that it succeeded."""
    for _ in range(600):
        if process.poll() is not None:
            break
        await asyncio.sleep(0.1)
    assert process.returncode == 0
