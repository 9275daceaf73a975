"""Test-only fault, loaded into a peer process by putting this folder on ``PYTHONPATH``.

With ``HOSPITAL_SOAK_PARTIAL_AGREE="<round>:<peer>"`` the aggregator of that round hands the
agreed record to ``<peer>`` alone and then dies (SIGKILL), as a machine that crashes while
it is sending the agreed record out. The window is a few milliseconds in real life (a random
kill almost never lands in it); this makes it certain. Without the variable nothing changes.
"""

from __future__ import annotations

import os

_SPEC = os.environ.get("HOSPITAL_SOAK_PARTIAL_AGREE", "")


def _install(round_: int, lucky: str) -> None:
    import asyncio
    import signal

    from peer.round import aggregating
    from peer.wire import peer_pb2 as pb

    finish = aggregating.AggregatorRound._finish

    def partial_finish(self: aggregating.AggregatorRound, final: object | None) -> None:
        if self.ctx.round != round_ or not isinstance(final, pb.AgreedRecord):
            finish(self, final)
            return
        self._close_stream(lucky, final)
        # Long enough for the lucky peer's bytes to leave, too short for anything else.
        asyncio.get_running_loop().call_later(0.5, os.kill, os.getpid(), signal.SIGKILL)

    aggregating.AggregatorRound._finish = partial_finish  # type: ignore[method-assign]


if _SPEC:
    _round, _, _lucky = _SPEC.partition(":")
    _install(int(_round), _lucky)
