"""One round of secure aggregation over gRPC streams: the aggregator's and a participant's side.

Theory of operation
-------------------
Every participant (the aggregator's own node included, through its own server) opens a
``RoundStream`` to the round's aggregator and sends a ``RoundHello``. Messages are secagg
objects, encoded by :mod:`peer.codec` and cut into fragments. The secagg state machines do all
protocol work; this package only moves messages, keeps deadlines and runs heavy steps (mask
expansion, unmasking, verification) in a worker thread so streams keep flowing.

After the unmasking stage the aggregator sends every connected participant the transcript and
a ``RecordDraft`` (the chain head and each peer's claimed epsilon). Each participant verifies
the transcript itself, computes the round's result with its payload, and signs the record
(``peer.ledger.record_payload``). The aggregator groups the signed records by hash; if at least
t peers signed the same record it sends it back with all its signatures and every peer stores
it. A peer that computed something else refuses to sign and says why.

A dropout is a missed deadline or a closed stream. An aggregator that vanishes is noticed by
the participants as a failed stream or as silence beyond its stage's deadline
(``participating.silence_limits``), and the round is retried with the next aggregator. Each
participant keeps its signed vote in its ledger before sending it and signs at most one record
per round; it announces a kept vote in the next attempts' hellos, and an aggregator that
collects t of them for one record completes that record (:mod:`.agreement`, ``vote``).

Modules: :mod:`.context` (what a round needs, the backend and role Protocols, fault hooks),
:mod:`.backends` (secagg, paillier, cleartext), :mod:`.aggregating`, :mod:`.participating`,
:mod:`.agreement` (records, signatures, the tally).
"""

from .aggregating import AggregatorRound, Elsewhere, serve_round_stream
from .agreement import valid_signatures
from .backends import BACKENDS, backend_for
from .context import (
    NO_FAULTS,
    FaultHooks,
    RoundBackend,
    RoundContext,
    RoundOutcome,
    RoundStatusKind,
    max_message_bytes,
)
from .participating import RoundStreamDialer, charge_before_release, participate

__all__ = [
    "BACKENDS",
    "NO_FAULTS",
    "AggregatorRound",
    "Elsewhere",
    "FaultHooks",
    "RoundBackend",
    "RoundContext",
    "RoundOutcome",
    "RoundStatusKind",
    "RoundStreamDialer",
    "backend_for",
    "charge_before_release",
    "max_message_bytes",
    "participate",
    "serve_round_stream",
    "valid_signatures",
]
