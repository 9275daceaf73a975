"""Security defaults of a real peer: mTLS only, keys 0600, and no secret in any log or ledger.

TLS versions and ciphers (1.2+ with AEAD suites only) and the refusal of a group-readable key
are tested in tests/test_tls.py; this module checks what a deployed kit and peer do.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from peer.codec import decode
from peer.config import load_config
from peer.identity import Role, identity_hostname
from peer.node import PeerNode
from peer.wire import peer_pb2 as pb
from secagg import DeterministicRandom, SuccinctTranscript

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "network"))
from network_harness import Network  # type: ignore[import-not-found, unused-ignore]

pytestmark = pytest.mark.timeout(300)


class RecordingRandom:
    """A seeded RandomSource that remembers every secret it hands out (tests only)."""

    def __init__(self, seed: str) -> None:
        self._source = DeterministicRandom(seed)
        self.handed_out: list[bytes] = []

    def token_bytes(self, n: int) -> bytes:
        out = self._source.token_bytes(n)
        self.handed_out.append(out)
        return out


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Network]:
    net = Network.create(tmp_path_factory.mktemp("defaults"), 3, length=64, start=False)
    net.peers["hospital-a"].start()
    yield net
    net.peers["hospital-a"].kill()


def _status(make_channel: Callable[[], grpc.aio.Channel]) -> grpc.StatusCode:
    async def call() -> grpc.StatusCode:
        channel = make_channel()  # inside the loop that uses it
        method = channel.unary_unary(
            "/hospital_secagg.v1.Peer/Status",
            request_serializer=pb.SessionRef.SerializeToString,
            response_deserializer=pb.SessionStatus.FromString,
        )
        try:
            await method(pb.SessionRef(session_id="x"), timeout=5)
        except grpc.aio.AioRpcError as error:
            return error.code()
        finally:
            await channel.close(None)
        return grpc.StatusCode.OK

    return asyncio.run(call())


def test_plaintext_connections_are_refused(network: Network) -> None:
    address = network.kit.kits["hospital-a"].address
    assert _status(lambda: grpc.aio.insecure_channel(address)) is grpc.StatusCode.UNAVAILABLE


def test_tls_without_a_client_certificate_is_refused(network: Network) -> None:
    kit = network.kit.kits["hospital-a"]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(kit.directory / "ca.pem").read_bytes()
    )
    name = identity_hostname(network.kit.federation.roster.federation, Role.PEER, "hospital-a")
    options = [("grpc.ssl_target_name_override", name)]
    channel = lambda: grpc.aio.secure_channel(kit.address, credentials, options=options)  # noqa: E731
    assert _status(channel) is grpc.StatusCode.UNAVAILABLE


def test_every_private_key_of_a_kit_is_0600(network: Network) -> None:
    keys = sorted(network.directory.rglob("*.key"))
    assert len(keys) >= 3
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


# ------------------------------------------------------------------ no secret is written


def _forms(secret: bytes) -> list[bytes]:
    """The ways a secret could end up in a text log or a database file."""
    return [
        secret,
        secret.hex().encode(),
        secret.hex().upper().encode(),
        base64.b64encode(secret).rstrip(b"="),
        repr(secret)[2:-1].encode()[:48],
    ]


def _revealed_secrets(network: Network) -> set[bytes]:
    """The secrets every stored round's succinct transcript reveals by design."""
    revealed: set[bytes] = set()
    for peer in network.peers:
        with network.ledger(peer) as ledger:
            for proof in ledger.round_proofs():
                transcript = decode("SuccinctTranscript", proof.transcript)
                assert isinstance(transcript, SuccinctTranscript)
                statement = transcript.statement
                revealed |= {secret for _, secret in (*statement.seeds, *statement.mask_keys)}
    return revealed


def _setter(event: asyncio.Event) -> Callable[[int], None]:
    return lambda _port: event.set()


@pytest.mark.slow
def test_no_secret_reaches_a_log_or_a_ledger(tmp_path: Path) -> None:
    network = Network.create(tmp_path, 3, length=64, start=False)
    rngs = {p: RecordingRandom(f"secrets/{p}") for p in network.peers}
    log_path = tmp_path / "peers.log"
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)

    async def run() -> dict[str, pb.SessionStatus | Exception]:
        nodes = [
            PeerNode(load_config(network.kit.kits[p].config), rng=rngs[p]) for p in network.peers
        ]
        ready = [asyncio.Event() for _ in nodes]
        serving = [
            asyncio.create_task(n.serve(on_ready=_setter(e)))
            for n, e in zip(nodes, ready, strict=True)
        ]
        await asyncio.gather(*(e.wait() for e in ready))
        operator = network.operator()
        proposal = network.proposal("secrets", rounds=2, stage_seconds=4.0, prepare_seconds=4.0)
        try:
            await operator.propose(proposal)
            await operator.start(proposal.session_id, proposal.participants)
            statuses: dict[str, pb.SessionStatus | Exception] = await operator.wait(
                proposal.session_id, proposal.participants, timeout=120
            )
            return statuses
        finally:
            await operator.close()
            for node in nodes:
                node.stop()
            await asyncio.gather(*serving)
            for node in nodes:
                node.ledger.close()

    try:
        statuses = asyncio.run(run())
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    assert {p: getattr(s, "state", s) for p, s in statuses.items()} == dict.fromkeys(
        network.peers, "finished"
    )
    for peer in network.peers:
        assert [r.record.round for r in network.records(peer, "secrets")] == [1, 2]

    # Every X25519 private key, self-mask seed and Shamir coefficient came from these
    # sources (AES-GCM nonces, 12 bytes, are public and left out).
    secrets = [s for rng in rngs.values() for s in rng.handed_out if len(s) >= 16]
    assert len(secrets) >= 3 * 2 * 3  # per peer and round: two key pairs and a seed at least
    for peer, vector in network.vectors.items():
        raw = vector.astype("<u4").tobytes()
        secrets += [raw[i : i + 16] for i in range(0, len(raw) - 16, 52)]  # windows of it
        secrets.append(", ".join(str(v) for v in vector[:3]).encode())  # as JSON/text
        secrets.append(" ".join(str(v) for v in vector[:3]).encode())  # as numpy prints it
        key_pem = (network.kit.kits[peer].directory / f"{peer}.key").read_text()
        body = [line for line in key_pem.splitlines() if line and not line.startswith("-----")]
        secrets += [line.encode() for line in body if len(line) >= 16]
        secrets.append(base64.b64decode("".join(body))[-32:])  # the raw private scalar
    # Except what the protocol reveals on purpose: a survivor's self-mask seed and a dropped
    # partner's mask key are reconstructed by the aggregator and published to every peer (as
    # shares before succinct verification, as the secrets themselves since), and kept in the
    # ledger so that verify-ledger can re-check the round (SECURITY.md, "Succinct
    # verification": once the round is unmasked they no longer protect anything).
    revealed = _revealed_secrets(network)
    assert revealed  # every round revealed at least its survivors' seeds
    secrets = [s for s in secrets if s not in revealed]
    files = [log_path, *sorted(tmp_path.rglob("ledger.db*"))]
    assert len(files) >= 4
    contents = {f: f.read_bytes() for f in files}
    assert sum(len(c) for c in contents.values()) > 10_000  # they do hold the session
    for secret in secrets:
        for form in _forms(secret):
            for path, content in contents.items():
                assert form not in content, f"a secret ({form[:12]!r}...) is in {path}"
