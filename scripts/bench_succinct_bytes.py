"""Stream payload bytes of one secagg round with succinct verification, in one process.

    python -m scripts.bench_succinct_bytes --peers 50 --length 1000000

Drives the same sans-I/O objects the peers run (``secagg.Participant``, ``secagg.Aggregator``
with a signing identity) and sizes every message with the peer's own codec
(``peer.codec.encode``): exactly the fragment payload a peer puts on or takes off its round
stream, less the round's hello and agreement messages (a few hundred bytes), and without
gRPC, TLS or TCP framing. It exists to measure n where real peer processes do not fit on a
small machine; ``scripts.bench transport`` measures the same figures over real processes and
the OS counters (BENCHMARKS.md compares both at n = 10).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time

import numpy as np

from peer.codec import encode
from secagg import Aggregator, DeterministicRandom, Participant, RoundConfig, testing


def measure(n: int, m: int) -> dict[str, object]:
    """Bytes per participant (median sent, received) and the aggregator's, per round; and,
    for one participant that is not the aggregator, its bytes by message kind."""
    peers = testing.peer_ids(n)
    signers, verifiers = testing.test_identities(peers, 1)
    config = RoundConfig("bytes", 1, peers, n // 2 + 1, m, colluders=1)
    aggregator_id = peers[0]
    data = np.random.default_rng(0)
    participants = {
        u: Participant(
            config,
            u,
            signers[u],
            verifiers,
            data.integers(0, 1 << 20, m, dtype=np.uint32),
            DeterministicRandom(u),
            aggregator_id,
        )
        for u in peers
    }
    aggregator = Aggregator(config, verifiers, aggregator_id, signers[aggregator_id])
    sent = dict.fromkeys(peers, 0)
    received = dict.fromkeys(peers, 0)
    watched = peers[-1]
    by_kind: collections.Counter[str] = collections.Counter()
    replies: dict[str, object] = {u: p.start() for u, p in participants.items()}
    while True:
        for u, reply in replies.items():
            kind, raw = encode(reply)
            sent[u] += len(raw)
            if u == watched:
                by_kind[f"sent {kind}"] += len(raw)
            aggregator.receive(reply)
        outgoing = aggregator.close_stage()
        if not outgoing:
            break
        sizes: dict[int, int] = {}  # a message sent to many is one object: size it once
        for u, message in outgoing.items():
            received[u] += sizes.setdefault(id(message), len(encode(message)[1]))
            if u == watched:
                by_kind[f"received {encode(message)[0]}"] += sizes[id(message)]
        replies = {u: participants[u].receive(message) for u, message in outgoing.items()}
    kind, raw = encode(aggregator.proof_answers())
    for u in peers:
        received[u] += len(raw)
    by_kind[f"received {kind}"] += len(raw)
    vector = 4 * m
    return {
        "n": n,
        "m": m,
        "vector_bytes": vector,
        "sent_per_peer": statistics.median(sent.values()),
        "received_per_peer": statistics.median(received.values()),
        "peer_ratio": max((sent[u] + received[u]) / vector for u in peers),
        "aggregator_in": sum(sent.values()),
        "aggregator_out": sum(received.values()),
        "aggregator_ratio": (sum(sent.values()) + sum(received.values())) / (n * vector),
        "by_kind": dict(by_kind),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--length", type=int, nargs="+", default=[1_000_000])
    parser.add_argument(
        "--by-kind", action="store_true", help="also print one participant's bytes by message"
    )
    args = parser.parse_args()
    for n in args.peers:
        for m in args.length:
            start = time.perf_counter()
            row = measure(n, m)
            print(
                f"n={n} m={m:,}: per peer sent {row['sent_per_peer']:,.0f} B, received "
                f"{row['received_per_peer']:,.0f} B, (sent + received) / vector "
                f"{row['peer_ratio']:.3f}x; aggregator in {row['aggregator_in']:,} B, out "
                f"{row['aggregator_out']:,} B, / (n * vector) {row['aggregator_ratio']:.3f}x "
                f"[{time.perf_counter() - start:.0f} s]"
            )
            if args.by_kind:
                by_kind = row["by_kind"]
                assert isinstance(by_kind, dict)
                for kind, size in by_kind.items():
                    print(f"    {kind}: {size:,} B")


if __name__ == "__main__":
    main()
