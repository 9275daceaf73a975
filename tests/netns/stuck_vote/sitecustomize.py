"""Test-only fault, loaded into one peer process by putting this folder on ``PYTHONPATH``.

With ``HOSPITAL_NETNS_STUCK_VOTE="<round>:<attempt>:<peer>[,<peer>...]"`` the aggregator of
that attempt shows the round's transcript and record draft only to itself and the named
peers: fewer than t signatures of a record nobody else saw, as the malicious (or crashing)
aggregator of SECURITY.md "Releasing a stuck vote". Those peers are left holding a signed
vote that can never reach t. What happens as soon as the aggregator holds their votes is
chosen by ``HOSPITAL_NETNS_STUCK_VOTE_FAULT``:

* ``kill`` (the default): it SIGKILLs itself;
* ``cut``: it only logs ``fault injection: aggregator X is cut holding N votes (...)`` and
  goes on as usual; the test cuts its link on that line (the harness's link emulation), so
  the aggregator stays alive but partitioned while the participants wait on it. It sends
  nothing more to anyone until its vote deadline (two stages), so a cut within that time
  loses nothing it would have sent (the test checks the cut came first).

A fault on a log line of the normal code would race the votes; here the k-th vote itself
triggers it, so the number of signers is exact. Without the variable nothing changes.
"""

from __future__ import annotations

import os

_SPEC = os.environ.get("HOSPITAL_NETNS_STUCK_VOTE", "")
_FAULT = os.environ.get("HOSPITAL_NETNS_STUCK_VOTE_FAULT", "kill")


def _install(round_: int, attempt: int, shown: frozenset[str], fault: str) -> None:
    import logging
    import signal

    from peer.round import aggregating

    if fault not in ("kill", "cut"):
        raise ValueError(f"HOSPITAL_NETNS_STUCK_VOTE_FAULT must be kill or cut, not {fault!r}")
    cls = aggregating.AggregatorRound
    send, deliver = cls._send, cls.deliver
    log = logging.getLogger("peer.faults")
    fired: set[int] = set()  # the rounds (by id) whose fault has fired: it fires once

    def targeted(self: aggregating.AggregatorRound) -> bool:
        return self.ctx.round == round_ and self.ctx.attempt == attempt

    def partial_send(self: aggregating.AggregatorRound, peer: str, message: object) -> None:
        # Once votes are collected, only the transcript and the draft go out: withhold both.
        if targeted(self) and self._collecting_votes and peer not in shown | {self.ctx.me}:
            return
        send(self, peer, message)

    def deliver_then_fault(self: aggregating.AggregatorRound, peer: str, message: object) -> None:
        deliver(self, peer, message)
        if (
            targeted(self)
            and id(self) not in fired
            and len(self._votes) >= len(shown | {self.ctx.me})
        ):
            fired.add(id(self))
            log.warning(
                "fault injection: aggregator %s %s holding %d votes (%s)",
                self.ctx.me,
                "dies" if fault == "kill" else "is cut",
                len(self._votes),
                ",".join(sorted(self._votes)),
            )
            if fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)

    cls._send = partial_send  # type: ignore[method-assign]
    cls.deliver = deliver_then_fault  # type: ignore[method-assign]


if _SPEC:
    _round, _attempt, _peers = _SPEC.split(":")
    _install(int(_round), int(_attempt), frozenset(_peers.split(",")), _FAULT)
