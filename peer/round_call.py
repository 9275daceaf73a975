"""The gRPC end of ``RoundStream``: the call a participant opens to the aggregator.

:meth:`peer.service.PeerService` hands each RoundStream call here. The round itself is
:func:`peer.round.serve_round_stream`; this module adds what belongs to the call:

- the raw request bytes are read (``context.read()``, not grpc's request iterator) and parsed
  into fragments here (:func:`received_fragments`), so that bytes that are not a Fragment
  are refused with INVALID_ARGUMENT naming the caller, rather than grpc's own UNKNOWN with a
  traceback;
- the stream is registered in ``open_streams`` so that a new CRL or roster that no longer
  accepts the caller closes it (:meth:`peer.node.Node` sets the event; :func:`_until`);
- the round's refusals become gRPC status codes (an :class:`Elsewhere` is answered in-band).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .codec import CodecError, fragments
from .identity import PeerIdentity
from .round import AggregatorRound, Elsewhere, serve_round_stream
from .tls import caller_identity
from .wire import peer_pb2 as pb

__all__ = ["received_fragments", "round_stream_call"]

logger = logging.getLogger("peer.node")


async def received_fragments(
    context: grpc.aio.ServicerContext[Any, Any],
) -> AsyncIterator[pb.Fragment]:
    """A RoundStream's fragments, read with ``context.read()``; bytes that are not one raise
    CodecError (naming no one: the caller is known to the stream, which reports it).

    Not grpc's request iterator: that async generator keeps the last raw message it yielded
    until the next one arrives, possibly a stage later, i.e. up to one fragment (1 MiB) per
    stream at the aggregator while the participants compute: O(n) again (issue 11;
    tests/round/test_round_call_memory.py). Here neither the raw bytes nor the fragment is
    referenced while the next read waits.
    """
    while True:
        raw = await context.read()
        if raw is grpc.aio.EOF:  # type: ignore[attr-defined]  # (grpc-stubs lack EOF)
            return
        try:
            fragment = pb.Fragment.FromString(raw)
        except DecodeError as error:
            raise CodecError(f"Fragment does not parse: {error}") from None
        del raw
        yield fragment
        del fragment


# How long an answer "elsewhere" waits for the caller to end the call (see its use).
ELSEWHERE_LINGER_SECONDS = 5.0


async def _drained(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Read and drop what the caller still sends, until it ends its side of the call."""
    async for _ in received_fragments(context):
        pass


async def _until(stop: asyncio.Event, source: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """The items of ``source`` until ``stop`` is set; then ``source`` is closed (its
    ``finally`` blocks run: a round sees the stream's peer leave) and iteration ends."""
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            item = asyncio.ensure_future(anext(source))
            await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not item.done():
                item.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await item
                return
            try:
                yield item.result()
            except StopAsyncIteration:
                return
    finally:
        stopped.cancel()
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


async def round_stream_call(
    context: grpc.aio.ServicerContext[Any, Any],
    *,
    me: str,
    open_streams: dict[asyncio.Event, PeerIdentity],
    find_round: Callable[[pb.RoundHello], Awaitable[AggregatorRound]],
    max_bytes: int,
    hello_seconds: float,
) -> AsyncIterator[pb.Fragment]:
    """Serve one RoundStream call (see the module docstring); ``me`` names this peer in logs."""
    identity = caller_identity()
    caller = identity.peer_id
    closing = asyncio.Event()  # set when a new CRL or roster no longer accepts the caller
    open_streams[closing] = identity
    try:
        async for fragment in _until(
            closing,
            serve_round_stream(
                received_fragments(context),
                caller,
                find_round,
                max_bytes,
                hello_seconds=hello_seconds,
            ),
        ):
            yield fragment
        if closing.is_set():
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the certificate of {caller} is no longer accepted (revoked or removed "
                "from the roster); stream closed",
            )
    except TimeoutError:
        logger.warning(
            "peer=%s closed a round stream from %s: no hello within %gs",
            me,
            caller,
            hello_seconds,
        )
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"{caller} sent no RoundHello within {hello_seconds:g}s; stream closed",
        )
    except Elsewhere as elsewhere:
        # Not an error of the caller: the round is elsewhere in time. Answered in-band
        # (an Abort message) rather than by aborting the call, which grpc can surface to
        # the client as INTERNAL when the client is still writing.
        logger.info("peer=%s round stream from %s: %s", me, caller, elsewhere.reason)
        for fragment in fragments(elsewhere.abort()):
            yield fragment
        # Then let the caller end the call: it writes its first message right after its
        # hello, and a call ended here meanwhile can reach it as INTERNAL instead of this
        # answer (then it stops waiting for a "not ready" aggregator; issue 11). Bounded:
        # a caller that neither reads nor goes away holds the stream no longer than this.
        with contextlib.suppress(TimeoutError, CodecError):
            await asyncio.wait_for(_drained(context), ELSEWHERE_LINGER_SECONDS)
    except PermissionError as error:
        logger.warning("peer=%s round stream from %s refused: %s", me, caller, error)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(error))
    except CodecError as error:  # the hello (later fragments are refused in the round)
        logger.warning("peer=%s round stream from %s refused: %s", me, caller, error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    except Exception:
        logger.exception("peer=%s round stream from %s failed", me, caller)
        raise
    finally:
        open_streams.pop(closing, None)
