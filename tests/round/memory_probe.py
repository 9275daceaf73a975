"""What the memory tests of a grpc server share (tests/round/test_round_read_ahead*.py,
test_round_send_buffer.py): the process's resident memory, a server with the peer's options
serving one stream-stream method, the participants' child process, and a fresh process for
the server's side.

grpc holds what it buffers in native memory, invisible to tracemalloc, so these tests read
the resident set size (RSS) of the process running the server, with the participants in a
child process so that only the server's memory is counted. The server itself runs in a
fresh interpreter (:func:`measured_in_a_fresh_process`): in pytest's own process, memory
freed by earlier tests is reused or not at the allocator's whim, which moved the figures by
megabytes either way (CI once read 5.0 MiB for a bound of 3.5 MiB; four runs of the same
sends in one process read 0.26, 0.00, 0.88 and 0.50 MiB).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
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


def measured_in_a_fresh_process(script: str, *args: str, timeout: float = 180.0) -> list[int]:
    """Run the test file ``script`` as a script with ``args`` in a fresh interpreter, whose
    heap has no history, and return the integers it printed (its measurement)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{Path(script).name} {' '.join(args)} failed:\n{done.stderr}"
    return [int(word) for word in done.stdout.split()]
