"""CPU of one participant and of the aggregator in one secure round, in process, through the
peer codec (issue 11, lane 11w).

    PYTHONPATH=<tree> python -m scripts.bench_roles_cpu [--peers 10] [--length 1000000]

Every message goes through :func:`peer.codec.fragments` and a :class:`peer.codec.Reassembler`
as on a RoundStream (no gRPC, no TLS, no ledger). Participant = the first peer's handlers, the
encoding of what it sends, the decoding of what it receives, and its check of the succinct
transcript; aggregator = its handlers, its decoding of every reply and its encoding of every
message it sends. ``time.process_time`` (the process's CPU, one thread), so the figure is
much steadier under load than a round's wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np

from peer.codec import Reassembler, fragments
from secagg import Aggregator, DeterministicRandom, GraphKind, Participant, RoundConfig
from secagg.messages import ConsistencySignature, LinearAnswers, MaskedInput
from secagg.succinct import SuccinctTranscript, verify_succinct
from secagg.testing import test_identities

AGGREGATOR = "aggregator"


def _through_codec(message: object) -> tuple[object, float, float]:
    """The message as its receiver decodes it, the CPU to encode it and to decode it."""
    start = time.process_time()
    cut = list(fragments(message))
    encoded = time.process_time() - start
    start = time.process_time()
    reassembler = Reassembler(1 << 34)
    received: object = None
    for fragment in cut:
        received = reassembler.push(fragment)
    return received, encoded, time.process_time() - start


def measure(n: int, m: int) -> dict[str, float]:
    peers = tuple(f"hospital-{i:02}" for i in range(n))
    signers, verifiers = test_identities((*peers, AGGREGATOR), 1)
    config = RoundConfig("bench", 0, peers, n * 2 // 3 + 1, m, 32, GraphKind.COMPLETE, None)
    data = np.random.default_rng(0)
    participants = {
        u: Participant(
            config,
            u,
            signers[u],
            verifiers,
            data.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32),
            DeterministicRandom(u),
            AGGREGATOR,
        )
        for u in peers
    }
    aggregator = Aggregator(config, verifiers, AGGREGATOR, signers[AGGREGATOR])
    me = peers[0]
    cpu = {"participant_s": 0.0, "aggregator_s": 0.0}
    sent: list[object] = []
    replies: dict[str, object] = {u: p.start() for u, p in participants.items()}
    while True:
        for u, reply in replies.items():
            if u == me:
                sent.append(reply)
            received, encoded, decoded = _through_codec(reply)
            cpu["participant_s"] += encoded if u == me else 0.0
            start = time.process_time()
            aggregator.receive(received)
            cpu["aggregator_s"] += decoded + time.process_time() - start
        start = time.process_time()
        outgoing = aggregator.close_stage()
        cpu["aggregator_s"] += time.process_time() - start
        if not outgoing:
            break
        replies = {}
        for u, message in outgoing.items():
            received, encoded, decoded = _through_codec(message)
            cpu["aggregator_s"] += encoded
            start = time.process_time()
            replies[u] = participants[u].receive(received)
            cpu["participant_s"] += decoded + time.process_time() - start if u == me else 0.0
    answers, encoded, decoded = _through_codec(aggregator.proof_answers())
    cpu["aggregator_s"] += encoded
    start = time.process_time()
    statement = participants[me].statement
    assert statement is not None
    own = next(s for s in sent if isinstance(s, MaskedInput))
    verify_succinct(
        SuccinctTranscript.completed(statement, answers),  # type: ignore[arg-type]
        config,
        verifiers,
        aggregator=AGGREGATOR,
        own=own,
        signed=next(s for s in sent if isinstance(s, ConsistencySignature)),
        own_answers=next(s for s in sent if isinstance(s, LinearAnswers)),
    )
    cpu["participant_s"] += decoded + time.process_time() - start
    return {k: round(v, 4) for k, v in cpu.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--length", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.peers, args.length)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
