"""A malicious aggregator or participant among real peer processes (gRPC + mTLS).

Each test starts four peers (threshold 3); one of them misbehaves through the test-only
``HOSPITAL_SECAGG_TAMPER_SEND`` hook (peer/faults.py). Every peer also runs with the hook's
observation mode, which logs the *owners* of every share a peer reveals (never the shares), so
the tests can check the one property that matters most: no peer's self-mask seed and mask key
were both revealed in a round, i.e. no individual input could be unmasked.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from peer.faults import TAMPER_ENV, TAMPER_SEND_ENV
from peer.session import SessionProposal
from secagg import UnmaskShares
from secagg.shamir import decode_share, encode_share

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "secagg"))
from network_harness import (  # type: ignore[import-not-found, unused-ignore]
    Network,
    expected_aggregator,
)
from secagg_testlib import make_round  # type: ignore[import-not-found, unused-ignore]

pytestmark = pytest.mark.timeout(300)

PEERS = 4
OBSERVE = "0:observe"  # no fault, but log whose shares are revealed
_REVEALED = re.compile(r"fault observation: round=(\d+) revealed self-mask=(\S+) mask-key=(\S+)")


def start_all(network: Network, env: dict[str, dict[str, str]] | None = None) -> None:
    """Start every peer at once (one by one costs seconds per peer)."""
    with ThreadPoolExecutor(len(network.peers)) as pool:
        for future in [
            pool.submit(process.start, (env or {}).get(peer))
            for peer, process in network.peers.items()
        ]:
            future.result()


@pytest.fixture
def make_network(tmp_path: Path) -> Iterator[Callable[..., Network]]:
    created: list[Network] = []

    def make(env: dict[str, dict[str, str]], *, start: bool = True) -> Network:
        ids = [f"hospital-{chr(ord('a') + i)}" for i in range(PEERS)]
        full = {p: {TAMPER_SEND_ENV: OBSERVE, **env.get(p, {})} for p in ids}
        network = Network.create(
            tmp_path / f"network-{len(created)}", PEERS, length=200, env=full, start=False
        )
        created.append(network)
        if start:
            start_all(network)
        return network

    yield make
    for network in created:  # everything was checked: no need for a graceful stop
        for process in network.peers.values():
            process.kill()


def _proposal(network: Network, session: str, rounds: int) -> Any:
    return network.proposal(session, rounds=rounds, stage_seconds=3.0, prepare_seconds=3.0)


def _aggregator(session: str, round_: int, rounds: int) -> str:
    """Round ``round_``'s first aggregator of ``_proposal(network, session, rounds)``,
    computed before the network starts (the harness fixes the peers' beacon nonces)."""
    ids = tuple(f"hospital-{chr(ord('a') + i)}" for i in range(PEERS))
    proposal = SessionProposal(
        session,
        ids,
        rounds=rounds,
        threshold=PEERS // 2 + 1,
        payload={"kind": "vector", "length": 200},
        stage_seconds=3.0,
        prepare_seconds=3.0,
    )
    return expected_aggregator(proposal, round_)


def _log(network: Network, peer: str) -> str:
    return str(network.peers[peer].log_path.read_text(encoding="utf-8"))


def revealed(network: Network) -> dict[int, tuple[set[str], set[str]]]:
    """Per round, whose self-mask seeds and whose mask keys some peer revealed a share of."""
    out: dict[int, tuple[set[str], set[str]]] = {}
    for peer in network.peers:
        for round_, selfs, keys in _REVEALED.findall(_log(network, peer)):
            mine = out.setdefault(int(round_), (set(), set()))
            mine[0].update(u for u in selfs.split(",") if u != "-")
            mine[1].update(u for u in keys.split(",") if u != "-")
    return out


def assert_no_input_revealed(network: Network) -> None:
    for round_, (selfs, keys) in revealed(network).items():
        assert not selfs & keys, f"round {round_}: both secrets of {selfs & keys} revealed"


def assert_agreed(network: Network, peers: list[str], session: str, round_: int) -> list[str]:
    """Round ``round_`` is agreed at ``peers`` on the sum of its survivors; returns them."""
    reference = network.records(peers[0], session)
    record = next(r for r in reference if r.record.round == round_)
    named = record.record.metrics["survivors"]
    assert isinstance(named, list)
    survivors = [str(peer) for peer in named]
    for peer in peers:
        assert [r.record_hash for r in network.records(peer, session)] == [
            r.record_hash for r in reference
        ], peer
        np.testing.assert_array_equal(
            network.aggregate_of(peer, session, round_), network.plain_sum(survivors)
        )
        assert network.verify(peer) == []
    return survivors


def assert_retried_without(network: Network, session: str, round_: int, liar: str) -> None:
    """What ``liar`` aggregated was agreed by nobody: the round was tried again under its
    number (rounds are never skipped) by the next aggregator, and that is what everyone
    agreed, with every peer's input in the sum."""
    survivors = assert_agreed(network, list(network.peers), session, round_)
    assert sorted(survivors) == sorted(network.peers)
    for peer in network.peers:
        record = next(r for r in network.records(peer, session) if r.record.round == round_)
        assert record.record.metrics["aggregator"] != liar, peer


def mask_keys_revealed(network: Network, round_: int) -> set[str]:
    """Whose mask keys were revealed in ``round_`` (no one drops out in these tests, so an
    honest attempt reveals none: any is the attack's doing)."""
    return revealed(network).get(round_, (set(), set()))[1]


# ------------------------------------------------------------------ malicious aggregator


@pytest.mark.slow
def test_wrong_aggregate_in_the_transcript_is_refused(
    make_network: Callable[..., Network],
) -> None:
    liar = _aggregator("s1", 1, 2)
    network = make_network({liar: {TAMPER_ENV: "1"}})
    network.run_session(_proposal(network, "s1", rounds=2))
    assert_retried_without(network, "s1", 1, liar)
    honest = [p for p in network.peers if p != liar]
    for peer in honest:
        assert f"{liar}: the aggregate is not the sum of the signed masked inputs" in _log(
            network, peer
        ), network.logs()
    # Round 2 too, by everyone.
    survivors = assert_agreed(network, list(network.peers), "s1", 2)
    assert sorted(survivors) == sorted(network.peers)
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_replayed_messages_of_an_earlier_round_are_refused(
    make_network: Callable[..., Network],
) -> None:
    # A session where one peer aggregates rounds 1 and 2: it replays round 1's messages.
    session = next(
        s
        for s in (f"replay-{i}" for i in range(100))
        if _aggregator(s, 1, 2) == _aggregator(s, 2, 2)
    )
    liar = _aggregator(session, 1, 2)
    network = make_network({liar: {TAMPER_SEND_ENV: "2:replay"}})
    network.run_session(_proposal(network, session, rounds=2))
    assert_agreed(network, list(network.peers), session, 1)
    assert_retried_without(network, session, 2, liar)
    for peer in network.peers:  # the liar's own participant refuses too
        assert re.search(
            rf"refused: {liar}: message for session '{session}' round 1, this is session "
            rf"'{session}' round 2 \(replayed or misrouted\)",
            _log(network, peer),
        ), network.logs()
    assert not mask_keys_revealed(network, 2)


@pytest.mark.slow
def test_request_for_both_shares_of_a_peer_is_refused(
    make_network: Callable[..., Network],
) -> None:
    liar = _aggregator("s1", 1, 1)
    network = make_network({liar: {TAMPER_SEND_ENV: "1:both-shares"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    assert_retried_without(network, "s1", 1, liar)
    for peer in network.peers:
        assert "that would reveal their input" in _log(network, peer), network.logs()
    assert not mask_keys_revealed(network, 1)  # the liar's attempt revealed nothing at all
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_different_survivor_sets_for_different_peers_reveal_nothing(
    make_network: Callable[..., Network],
) -> None:
    # hospital-a is told hospital-d dropped out, the others that it survived. a's consistency
    # signature then covers another set: it is left out, and d's mask key is never revealed.
    liar = _aggregator("s1", 1, 1)
    network = make_network({liar: {TAMPER_SEND_ENV: "1:split-survivors"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    assert "invalid signature on its consistency check" in _log(network, liar)
    others = [p for p in network.peers if p != "hospital-a"]
    assert_agreed(network, others, "s1", 1)
    selfs, keys = revealed(network)[1]
    assert "hospital-d" in selfs
    assert not keys
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_unmask_request_naming_another_survivor_set_is_refused(
    make_network: Callable[..., Network],
) -> None:
    # hospital-a alone is asked for hospital-d's mask key (as if d had dropped) while the
    # others reveal d's self-mask share: a refuses, so d's input stays hidden.
    liar = _aggregator("s1", 1, 1)
    network = make_network({liar: {TAMPER_SEND_ENV: "1:split-unmask"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    assert f"refused: {liar}: unmask request names a survivor set other than the one I signed" in (
        _log(network, "hospital-a")
    ), network.logs()
    others = [p for p in network.peers if p != "hospital-a"]
    assert_agreed(network, others, "s1", 1)
    selfs, keys = revealed(network)[1]
    assert "hospital-d" in selfs
    assert not keys
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_substituted_public_keys_are_refused(make_network: Callable[..., Network]) -> None:
    liar = _aggregator("s1", 1, 1)
    network = make_network({liar: {TAMPER_SEND_ENV: "1:substitute-keys"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    assert_retried_without(network, "s1", 1, liar)
    for peer in network.peers:
        assert re.search(
            rf"refused: {liar}: relayed an advert of \S+ whose signature is invalid",
            _log(network, peer),
        ), network.logs()
    assert not mask_keys_revealed(network, 1)


# ------------------------------------------------------------------ malicious participant


def _cheat(session: str, rounds: int) -> str:
    """A peer that does not aggregate round 1."""
    return next(
        p
        for p in sorted(f"hospital-{chr(ord('a') + i)}" for i in range(PEERS))
        if p != _aggregator(session, 1, rounds)
    )


@pytest.mark.slow
def test_masked_vector_of_the_wrong_length_is_left_out(
    make_network: Callable[..., Network],
) -> None:
    cheat = _cheat("s1", 1)
    network = make_network({cheat: {TAMPER_SEND_ENV: "1:wrong-length"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    aggregator = _aggregator("s1", 1, 1)
    assert re.search(
        rf"stage=masked rejected message from {cheat}: masked vector has shape \(199,\)",
        _log(network, aggregator),
    ), network.logs()
    honest = [p for p in network.peers if p != cheat]
    survivors = assert_agreed(network, honest, "s1", 1)
    assert sorted(survivors) == honest
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_masked_input_signed_with_another_peers_key_is_left_out(
    make_network: Callable[..., Network],
) -> None:
    cheat = _cheat("s1", 1)
    # A key file of another institution (stolen, say): a valid signature, but not cheat's.
    network = make_network({}, start=False)
    other = next(p for p in network.peers if p != cheat)
    stolen = network.kit.kits[other].directory / f"{other}.key"
    start_all(network, {cheat: {TAMPER_SEND_ENV: f"1:sign-as:{stolen}"}})
    network.run_session(_proposal(network, "s1", rounds=1))
    assert re.search(
        rf"stage=masked rejected message from {cheat}: invalid signature on its masked input",
        _log(network, _aggregator("s1", 1, 1)),
    ), network.logs()
    honest = [p for p in network.peers if p != cheat]
    survivors = assert_agreed(network, honest, "s1", 1)
    assert sorted(survivors) == honest
    assert_no_input_revealed(network)


@pytest.mark.slow
def test_shares_that_do_not_reconstruct_are_attributed_and_left_out(
    make_network: Callable[..., Network],
) -> None:
    cheat = _cheat("s1", 2)
    network = make_network({cheat: {TAMPER_SEND_ENV: "1:bad-shares"}})
    network.run_session(_proposal(network, "s1", rounds=2))
    aggregator = _aggregator("s1", 1, 2)
    # Four holders, threshold 3: the wrong shares are found, blamed on their sender, and the
    # secrets rebuilt from the other three; the (correct) sum is agreed by everyone.
    assert re.search(
        rf"participant={cheat} revealed wrong shares",
        _log(network, aggregator),
    ), network.logs()
    assert_agreed(network, list(network.peers), "s1", 1)
    assert_agreed(network, list(network.peers), "s1", 2)
    assert_no_input_revealed(network)


def test_a_wrong_share_is_attributed_to_its_sender_and_the_round_completes() -> None:
    r = make_round(4, threshold=3)
    outgoing = r.advance(4)
    cheat = "hospital-b"
    replies = r.respond(outgoing)
    bad = replies[cheat]
    assert isinstance(bad, UnmaskShares)
    shares = tuple((u, encode_share(decode_share(s) + 1)) for u, s in bad.self_mask_shares)
    bad = replace(bad, self_mask_shares=shares)
    replies[cheat] = replace(
        bad, signature=r.signers[cheat].sign(bad.signed_payload(r.config.digest))
    )
    r.collect(r.respond(r.collect(replies)))  # unmask, then the linear check's answers
    assert r.aggregator.result is not None
    np.testing.assert_array_equal(r.aggregator.result.aggregate, r.expected_sum(r.peers))
    assert r.aggregator.misbehaving == {cheat}
