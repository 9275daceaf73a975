"""The state of a session as a peer reports it (``SessionStatus.state`` on the wire).

One vocabulary for the peer, the operator's library and the CLI. The ledger persists a
subset (:class:`peer.ledger.SessionStatus`); a running peer adds two states of its own: a
runner that has run its rounds and only waits for the others is ``settling``, one stopped by
an error is ``failed``. The values are the wire strings: do not rename them.
"""

from __future__ import annotations

from enum import StrEnum

from .ledger import SessionStatus

__all__ = ["FINAL_STATES", "SessionState"]


class SessionState(StrEnum):
    PROPOSED = "proposed"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    RUNNING = "running"
    SETTLING = "settling"  # rounds done here; waiting (bounded) for the others to end
    FINISHED = "finished"
    ABORTED = "aborted"
    FAILED = "failed"  # the runner stopped by an error (see the status detail)
    UNKNOWN = "unknown"  # no such session here

    @classmethod
    def of(cls, status: SessionStatus) -> SessionState:
        """The reported state of a session whose ledger status is ``status``."""
        return cls(status.value)


# States a session never leaves.
FINAL_STATES = frozenset(
    {SessionState.FINISHED, SessionState.ABORTED, SessionState.REFUSED, SessionState.FAILED}
)
