"""Fault injection for tests: a peer process that kills itself at a named point.

Set ``HOSPITAL_SECAGG_KILL_AT`` to ``<round>:<point>`` (e.g. ``1:masked``) and the peer sends
itself SIGKILL when it reaches that point of that round, exactly as if the machine died
there. Points are a participant's stages (``advertise``, ``share``, ``masked``,
``consistency``, ``unmask``, ``sign``: just before it would send that stage's message) and
the aggregator's (``aggregator:<stage>``: just before it closes that stage). Unset in
production, it costs one dictionary lookup per stage.
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_AT_ENV", "TAMPER_ENV", "fault_point", "tamper_transcript_aggregate"]

KILL_AT_ENV = "HOSPITAL_SECAGG_KILL_AT"


def fault_point(round_: int, point: str) -> None:
    target = os.environ.get(KILL_AT_ENV)
    if target and target == f"{round_}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


TAMPER_ENV = "HOSPITAL_SECAGG_TAMPER_TRANSCRIPT"


def tamper_transcript_aggregate(round_: int) -> bool:
    """True when a test asks this aggregator to publish a wrong aggregate in ``round_``.

    Set ``HOSPITAL_SECAGG_TAMPER_TRANSCRIPT`` to the round number. It plays a malicious
    aggregator, so that tests can check every other peer refuses to sign.
    """
    return os.environ.get(TAMPER_ENV) == str(round_)
