"""Real peer processes, each in its own Linux network namespace, over emulated WAN links.

Every hospital (and the operator) gets a network namespace ``hsa<pid>-<n>-<name>`` with one
TUN interface ``eth0`` holding an address of our private test range ``10.213.0.0/24``; the
peer runs there with ``ip netns exec NS python -m peer start --config ...`` and listens on its
namespace address, which is its roster address. The other end of every TUN interface is a
:class:`LinkEmulator` thread in the test process: a small IPv4 switch that forwards packets
between the namespaces, applying per-link delay and random loss, and that can cut a link
(drop everything to and from one host, in-flight packets included) while its peer process
keeps running. So every connection between peers crosses two kernel TCP/IP stacks and real
interfaces, and a partition looks to both sides like a dead WAN link: silence, no RST.

Why not veth + bridge + ``tc netem``: netem is a kernel module that is not always there (the
kernel this was written on is built without ``CONFIG_NET_SCH_NETEM``), whereas TUN devices and
network namespaces are. The emulator applies the conditions on each host's egress, as
``netem`` on each host's interface would: between two hospitals with ``delay=0.05`` the
round-trip time is 100 ms.

Nothing is created in the root namespace: TUN devices are opened by a short-lived thread that
has entered the host's namespace (``setns``), and they disappear when their file descriptor is
closed. :meth:`NetnsFederation.close` (also run on failure, and by :func:`sweep_stale` for runs
that were killed) stops the peers and deletes every namespace of the run.

The operator is a helper process (``python netns_harness.py operate SPEC``) run in the
operator's namespace; it prints one JSON line per event (``started``, ``done``, ``error``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import fcntl
import hashlib
import heapq
import ipaddress
import itertools
import json
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from peer.beacon import TEST_NONCE_ENV, beacon_of
from peer.identity import Role
from peer.identity.testing import LocalFederation
from peer.kit import Kit, LocalKit, write_peer_config
from peer.ledger import Ledger, StoredRecord
from peer.session import SessionProposal, aggregator_for

__all__ = [
    "LinkConditions",
    "LinkEmulator",
    "NetnsFederation",
    "NsPeer",
    "OperatorRun",
    "RoundLine",
    "Trigger",
    "netns_unavailable_reason",
    "sweep_stale",
]

REPO = Path(__file__).resolve().parents[2]
SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
PEER_PORT = 7443
VECTOR_FILE = "vector.npy"
NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "hsa"
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_run_counter = itertools.count()


def fixed_nonce(peer_id: str) -> bytes:
    """The beacon nonce fixed for ``peer_id`` (as in tests/network/network_harness.py)."""
    return hashlib.sha256(b"network-harness/beacon-nonce/" + peer_id.encode()).digest()


# ====================================================================== environment


def _ip(*args: str) -> None:
    """Run ``ip ARGS`` and raise with its message on failure."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise OSError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


def netns_unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (ip netns add)"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2 (the ip command)"
    if not Path("/dev/net/tun").exists():
        return "network namespace tests need /dev/net/tun"
    probe = f"{NAME_PREFIX}{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except OSError as error:
        return f"cannot create a network namespace: {error}"
    try:
        _open_tun_in(probe, "eth0")[1]()
    except OSError as error:
        return f"cannot create a TUN device in a network namespace: {error}"
    finally:
        with contextlib.suppress(OSError):
            _ip("netns", "del", probe)
    return None


def sweep_stale() -> list[str]:
    """Delete namespaces left by earlier runs of this harness whose process is gone."""
    removed: list[str] = []
    if not NETNS_DIR.is_dir():
        return removed
    for entry in NETNS_DIR.iterdir():
        match = re.fullmatch(rf"{NAME_PREFIX}(\d+)-.+", entry.name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                _ip("netns", "del", entry.name)
                removed.append(entry.name)
        except PermissionError:
            pass  # alive, someone else's
    return removed


def _open_tun_in(netns: str, ifname: str) -> tuple[int, Callable[[], None]]:
    """Open a TUN device named ``ifname`` inside ``netns``; returns (fd, close).

    Only the calling thread of ``setns`` changes namespace, so a throwaway thread does it and
    the test process itself never leaves the root namespace. The device lives as long as fd.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ns_fd = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                if libc.setns(ns_fd, _CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns into {netns}: {os.strerror(errno)}")
            finally:
                os.close(ns_fd)
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            try:
                request = struct.pack("16sH", ifname.encode(), _IFF_TUN | _IFF_NO_PI)
                fcntl.ioctl(fd, _TUNSETIFF, request)
            except OSError:
                os.close(fd)
                raise
            result["fd"] = fd
        except OSError as error:
            result["error"] = error

    thread = threading.Thread(target=work, name=f"tun-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    fd: int = result["fd"]
    return fd, lambda: os.close(fd)


# ====================================================================== link emulation


@dataclass(frozen=True)
class LinkConditions:
    """What a host's link does to the packets it sends: one-way delay (s) and loss (0..1)."""

    delay: float = 0.0
    loss: float = 0.0


@dataclass
class _Port:
    name: str
    fd: int
    address: bytes
    conditions: LinkConditions = field(default_factory=LinkConditions)
    cut: bool = False
    # A site firewall that accepts no inbound connection: TCP SYNs to this host are dropped
    # (its own outbound connections, and their replies, pass).
    inbound_blocked: bool = False


@dataclass
class LinkStats:
    forwarded: int = 0
    lost: int = 0  # random loss
    cut: int = 0  # dropped because a link was cut
    firewalled: int = 0  # connection attempts to a host that accepts no inbound connection
    other: int = 0  # not IPv4, unknown destination, full queue


class LinkEmulator:
    """An IPv4 switch between TUN file descriptors, with per-host delay, loss and cuts.

    Packets from a host whose link is cut, or to one, are dropped, including those already
    in flight when the cut happens (checked again at delivery). Delays are per source, so
    packets between two hosts are never reordered. ``rng`` decides losses only (no secret).
    """

    def __init__(self, rng: random.Random, clock: Callable[[], float] = time.monotonic) -> None:
        self._rng = rng
        self._clock = clock
        self._ports: dict[str, _Port] = {}
        self._by_address: dict[bytes, _Port] = {}
        self._queue: list[tuple[float, int, _Port, _Port, bytes]] = []
        self._sequence = itertools.count()
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = LinkStats()

    def attach(self, name: str, fd: int, address: str) -> None:
        port = _Port(name, fd, ipaddress.IPv4Address(address).packed)
        self._ports[name] = port
        self._by_address[port.address] = port
        self._selector.register(fd, selectors.EVENT_READ, port)

    def set_conditions(self, name: str, conditions: LinkConditions) -> None:
        self._ports[name].conditions = conditions

    def cut(self, name: str) -> None:
        """Partition ``name``: nothing reaches it or leaves it until :meth:`heal`."""
        self._ports[name].cut = True

    def heal(self, name: str) -> None:
        self._ports[name].cut = False
        self._poke()

    def block_inbound(self, name: str) -> None:
        """Drop every new TCP connection to ``name`` (SYN without ACK), as its firewall would."""
        self._ports[name].inbound_blocked = True

    def is_cut(self, name: str) -> bool:
        return self._ports[name].cut

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="link-emulator", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._poke()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"x")

    def _run(self) -> None:
        while not self._stopping:
            timeout = max(0.0, self._queue[0][0] - self._clock()) if self._queue else None
            for key, _ in self._selector.select(timeout):
                port = key.data
                if port is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_read, 4096)
                    continue
                self._drain(port)
            self._deliver_due()

    def _drain(self, source: _Port) -> None:
        while True:
            try:
                packet = os.read(source.fd, 65536)
            except (BlockingIOError, OSError):
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                self.stats.other += 1
                continue
            target = self._by_address.get(packet[16:20])
            if target is None:
                self.stats.other += 1
            elif source.cut or target.cut:
                self.stats.cut += 1
            elif target.inbound_blocked and _opens_tcp_connection(packet):
                self.stats.firewalled += 1
            elif self._rng.random() < source.conditions.loss:
                self.stats.lost += 1
            else:
                due = self._clock() + source.conditions.delay
                heapq.heappush(self._queue, (due, next(self._sequence), source, target, packet))

    def _deliver_due(self) -> None:
        now = self._clock()
        while self._queue and self._queue[0][0] <= now:
            _, _, source, target, packet = heapq.heappop(self._queue)
            if source.cut or target.cut:
                self.stats.cut += 1
                continue
            try:
                os.write(target.fd, packet)
                self.stats.forwarded += 1
            except (BlockingIOError, OSError):
                self.stats.other += 1


def _opens_tcp_connection(packet: bytes) -> bool:
    """Whether an IPv4 packet is a TCP SYN without ACK (the first packet of a connection)."""
    header = (packet[0] & 0x0F) * 4
    if packet[9] != 6 or len(packet) < header + 14:  # not TCP, or truncated
        return False
    flags = packet[header + 13]
    return bool(flags & 0x02) and not flags & 0x10


# ====================================================================== processes


@dataclass
class NsPeer:
    """One ``python -m peer start`` process inside its host's namespace."""

    peer_id: str
    netns: str
    address: str
    config: Path
    log_path: Path
    process: subprocess.Popen[str] | None = None

    def spawn(self, extra_env: Mapping[str, str] | None = None) -> None:
        # Fixed beacon nonces, so that tests know who aggregates before the session starts.
        env = {**os.environ, TEST_NONCE_ENV: fixed_nonce(self.peer_id).hex(), **(extra_env or {})}
        with self.log_path.open("a", encoding="utf-8") as log:
            self.process = subprocess.Popen(
                [
                    *("ip", "netns", "exec", self.netns),
                    *(sys.executable, "-m", "peer", "start", "--config", str(self.config)),
                ],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=REPO,
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        line = _readline(self.process.stdout, deadline)
        if not line or json.loads(line).get("event") != "ready":
            raise RuntimeError(f"{self.peer_id} did not start ({line!r}):\n{self.log()}")

    def stop(self, grace: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text("utf-8") if self.log_path.exists() else ""


def _readline(stream: IO[str], deadline: float) -> str:
    """One line from a pipe, or "" if none came before ``deadline`` (monotonic)."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(max(0.0, deadline - time.monotonic())):
            return ""
    return stream.readline()


@dataclass
class Trigger:
    """Runs ``action`` once, as soon as ``pattern`` appears in ``path`` after arming."""

    path: Path
    pattern: re.Pattern[str]
    action: Callable[[], None]
    fired_at: float | None = None
    matched: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def arm(self, poll: float = 0.003) -> Trigger:
        offset = self.path.stat().st_size if self.path.exists() else 0

        def watch() -> None:
            seen = ""
            while not self._stop.is_set():
                with contextlib.suppress(FileNotFoundError), self.path.open("rb") as handle:
                    handle.seek(offset + len(seen.encode()))
                    seen += handle.read().decode("utf-8", errors="replace")
                match = self.pattern.search(seen)
                if match is not None:
                    self.action()
                    self.fired_at = time.monotonic()
                    self.matched = match.group(0)
                    return
                self._stop.wait(poll)

        self._thread = threading.Thread(target=watch, name=f"trigger-{self.path}", daemon=True)
        self._thread.start()
        return self

    def disarm(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class OperatorRun:
    """The operator helper process: propose, start, wait; its events arrive as they happen."""

    def __init__(
        self, command: list[str], on_started: Callable[[], None] | None, timeout: float
    ) -> None:
        self.events: list[dict[str, Any]] = []
        self._done = threading.Event()
        self._timeout = timeout
        self._on_started = on_started
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        self._reader = threading.Thread(target=self._read, name="operator-events", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = json.loads(line)
            if event["event"] == "started" and self._on_started is not None:
                self._on_started()
            self.events.append(event)
        self._done.set()

    def result(self) -> dict[str, str]:
        """Each peer's final session state (or the error asking it); raises if the run failed."""
        finished = self._done.wait(self._timeout + 60)
        if not finished:
            self.process.kill()
        self.process.wait(timeout=10)
        assert self.process.stderr is not None
        errors = self.process.stderr.read()
        last: dict[str, Any] = self.events[-1] if self.events else {"event": "none"}
        if last["event"] != "done":
            raise RuntimeError(f"operator run failed: {last}\n{errors[-4000:]}")
        states: dict[str, Any] = last["states"]
        return {str(peer): str(state) for peer, state in states.items()}


# ====================================================================== the federation


@dataclass(frozen=True)
class RoundLine:
    """A peer's log line concluding one round attempt."""

    round: int
    attempt: int
    outcome: str
    seconds: float
    reason: str


_OUTCOME = re.compile(
    r"round=(\d+) attempt=(\d+) outcome=([\w-]+) in ([\d.]+)s ?(.*)$", re.MULTILINE
)


@dataclass
class NetnsFederation:
    """A federation of peers, each in its own namespace, plus an operator namespace."""

    directory: Path
    prefix: str
    kit: LocalKit
    peers: dict[str, NsPeer]
    vectors: dict[str, np.ndarray[Any, Any]]
    links: LinkEmulator
    namespaces: list[str]
    operator_netns: str
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _triggers: list[Trigger] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        directory: Path,
        n: int,
        *,
        length: int = 1000,
        stage_seconds: float = 6.0,
        conditions: LinkConditions = LinkConditions(),
        seed: int = 0,
        start: bool = True,
        outbound_only: Sequence[str] = (),
    ) -> NetnsFederation:
        """Namespaces, links, kits with namespace addresses, vectors; peers started.

        The hosts in ``outbound_only`` have no address in the roster and their link drops
        every inbound connection (:meth:`LinkEmulator.block_inbound`).
        """
        sweep_stale()
        prefix = f"{NAME_PREFIX}{os.getpid()}-{next(_run_counter)}"
        ids = [f"hospital-{chr(ord('a') + i)}" for i in range(n)]
        hosts = list(SUBNET.hosts())
        addresses = {p: str(hosts[i]) for i, p in enumerate(ids)}
        operator_address = str(hosts[200])
        links = LinkEmulator(random.Random(seed))
        fed: NetnsFederation | None = None
        namespaces: list[str] = []
        closers: list[Callable[[], None]] = []
        try:
            for name, address in [*addresses.items(), ("operator", operator_address)]:
                netns = f"{prefix}-{name}"
                _ip("netns", "add", netns)
                namespaces.append(netns)
                fd, close = _open_tun_in(netns, "eth0")
                closers.append(close)
                _ip("-n", netns, "addr", "add", f"{address}/{SUBNET.prefixlen}", "dev", "eth0")
                _ip("-n", netns, "link", "set", "eth0", "up")
                _ip("-n", netns, "link", "set", "lo", "up")
                links.attach(name, fd, address)
                if name != "operator":
                    links.set_conditions(name, conditions)
                if name in outbound_only:
                    links.block_inbound(name)
            links.start()
            kit = _write_kit(
                directory,
                {p: f"{addresses[p]}:{PEER_PORT}" for p in ids},
                stage_seconds,
                outbound_only,
            )
            rng = np.random.default_rng(seed)
            vectors: dict[str, np.ndarray[Any, Any]] = {}
            peers: dict[str, NsPeer] = {}
            for peer_id in ids:
                site = kit.kits[peer_id]
                vectors[peer_id] = rng.integers(0, 2**32, size=length, dtype=np.uint64).astype(
                    np.uint32
                )
                np.save(site.directory / VECTOR_FILE, vectors[peer_id])
                peers[peer_id] = NsPeer(
                    peer_id,
                    f"{prefix}-{peer_id}",
                    addresses[peer_id],
                    site.config,
                    site.directory / "peer.log",
                )
            fed = cls(
                directory,
                prefix,
                kit,
                peers,
                vectors,
                links,
                namespaces,
                f"{prefix}-operator",
                closers,
            )
            if start:
                fed.start(list(peers))
            return fed
        except BaseException:
            if fed is not None:
                fed.close()
            else:
                links.stop()
                for close in closers:
                    close()
                for netns in namespaces:
                    with contextlib.suppress(OSError):
                        _ip("netns", "del", netns)
            raise

    def start(
        self, peer_ids: Sequence[str], env: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        """Start peers in parallel (Python start-up dominates) and wait until all serve."""
        for peer_id in peer_ids:
            self.peers[peer_id].spawn((env or {}).get(peer_id))
        deadline = time.monotonic() + 90
        for peer_id in peer_ids:
            self.peers[peer_id].wait_ready(deadline)

    def close(self) -> None:
        """Stop peers, links and triggers, delete every namespace of this run."""
        for trigger in self._triggers:
            trigger.disarm()
        for process in self.peers.values():
            with contextlib.suppress(Exception):
                process.stop(grace=3.0)
        self.links.stop()
        for close in self._closers:
            with contextlib.suppress(OSError):
                close()
        self._closers.clear()
        for netns in self.namespaces:
            with contextlib.suppress(OSError):
                _ip("netns", "del", netns)
        self.namespaces.clear()

    def logs(self) -> str:
        return "\n".join(f"===== {p.peer_id}\n{p.log()}" for p in self.peers.values())

    # ------------------------------------------------------------------ network faults

    def cut(self, peer_id: str) -> None:
        self.links.cut(peer_id)

    def heal(self, peer_id: str) -> None:
        self.links.heal(peer_id)

    def when_logged(self, peer_id: str, pattern: str, action: Callable[[], None]) -> Trigger:
        """Run ``action`` as soon as ``peer_id`` logs a line matching ``pattern`` from now on."""
        trigger = Trigger(self.peers[peer_id].log_path, re.compile(pattern), action).arm()
        self._triggers.append(trigger)
        return trigger

    # ------------------------------------------------------------------ operator side

    def proposal(
        self,
        session_id: str,
        rounds: int,
        *,
        threshold: int | None = None,
        stage_seconds: float = 6.0,
        prepare_seconds: float = 3.0,
    ) -> SessionProposal:
        ids = tuple(self.peers)
        return SessionProposal(
            session_id,
            ids,
            rounds=rounds,
            threshold=threshold
            if threshold is not None
            else SessionProposal.default_threshold(len(ids)),
            payload={"kind": "vector", "length": len(next(iter(self.vectors.values())))},
            outbound_only=tuple(p for p in ids if not self.kit.federation.roster[p].inbound),
            stage_seconds=stage_seconds,
            prepare_seconds=prepare_seconds,
        )

    def run_session(
        self,
        proposal: SessionProposal,
        *,
        on_started: Callable[[], None] | None = None,
        timeout: float = 150.0,
        require_all: bool = False,
        rpc_timeout: float = 3.0,
    ) -> dict[str, str]:
        """Propose and start from the operator's namespace; wait for the session to end.

        Returns each peer's state ("finished", ...) or the error the operator got asking it.
        ``on_started`` runs as soon as every peer has accepted the Start call.
        """
        member = self.kit.federation.members[self.kit.operator]
        roster = self.kit.federation.roster_path
        assert member.role is Role.OPERATOR
        assert roster is not None
        spec = self.directory / f"operate-{proposal.session_id}.json"
        spec.write_text(
            json.dumps(
                {
                    "operator": self.kit.operator,
                    "cert": str(member.cert),
                    "key": str(member.key),
                    "ca": str(member.ca),
                    "roster": str(roster),
                    "proposal": proposal.document(),
                    "timeout": timeout,
                    "rpc_timeout": rpc_timeout,
                    "require_all": require_all,
                }
            ),
            encoding="utf-8",
        )
        command = ["ip", "netns", "exec", self.operator_netns, sys.executable]
        command += [str(Path(__file__).resolve()), "operate", str(spec)]
        return OperatorRun(command, on_started, timeout).result()

    @staticmethod
    def aggregator(proposal: SessionProposal, round_: int, attempt: int = 0) -> str:
        beacon = beacon_of(proposal.digest, {p: fixed_nonce(p) for p in proposal.participants})
        return aggregator_for(proposal, round_, attempt, beacon)

    # ------------------------------------------------------------------ ledgers and logs

    def ledger(self, peer_id: str) -> Ledger:
        return self.kit.ledger(peer_id)

    def records(self, peer_id: str, session_id: str) -> list[StoredRecord]:
        with self.ledger(peer_id) as ledger:
            return ledger.agreed_records(session_id)

    def aggregate_of(self, peer_id: str, session_id: str, round_: int) -> np.ndarray[Any, Any]:
        with self.ledger(peer_id) as ledger:
            checkpoint = ledger.get_checkpoint(session_id, round_)
        assert checkpoint is not None, f"{peer_id} has no result for round {round_}"
        return np.frombuffer(checkpoint.weights, dtype="<u4").astype(np.uint32)

    def plain_sum(self, peer_ids: Sequence[str]) -> np.ndarray[Any, Any]:
        total = np.zeros_like(next(iter(self.vectors.values())))
        for peer_id in peer_ids:
            np.add(total, self.vectors[peer_id], out=total)
        return total

    def verify(self, peer_id: str) -> list[str]:
        return self.kit.ledger_problems(peer_id)

    def round_lines(self, peer_id: str, session_id: str) -> list[RoundLine]:
        """The ``outcome=`` lines ``peer_id`` logged for ``session_id``, in order."""
        lines = [
            ln for ln in self.peers[peer_id].log().splitlines() if f"session={session_id} " in ln
        ]
        return [
            RoundLine(int(m[1]), int(m[2]), m[3], float(m[4]), m[5])
            for m in _OUTCOME.finditer("\n".join(lines))
        ]


def _write_kit(
    directory: Path,
    addresses: Mapping[str, str],
    stage_seconds: float,
    outbound_only: Sequence[str] = (),
) -> LocalKit:
    """What :meth:`LocalKit.create` writes, with the given (namespace) addresses; the peers
    in ``outbound_only`` still listen there, but the roster gives them no address."""
    directory.mkdir(parents=True, exist_ok=True)
    operator = "ceremony-operator"
    peers = list(addresses)
    fed = LocalFederation.create(
        directory / "identities",
        federation="netns",
        peers=peers,
        operators=[operator],
        addresses=addresses,
        outbound_only=outbound_only,
    )
    kits: dict[str, Kit] = {}
    for peer_id in peers:
        site = fed.members[peer_id].cert.parent
        assert fed.roster_path is not None
        for source in (fed.ca.cert_path, fed.roster_path, fed.ca.crl_path):
            shutil.copy(source, site / source.name)
        shutil.copy(Path(f"{fed.roster_path}.sig"), site / f"{fed.roster_path.name}.sig")
        config = site / f"{peer_id}.toml"
        write_peer_config(
            config,
            peer_id,
            addresses[peer_id],
            stage_seconds=stage_seconds,
            policy={"allowed_operators": [operator], "allow_exact_payloads": True},
            extra=f'payload_file = "{VECTOR_FILE}"',
        )
        kits[peer_id] = Kit(peer_id, site, config, addresses[peer_id])
    return LocalKit(fed, kits, operator)


@contextlib.contextmanager
def federation(directory: Path, n: int, **kwargs: Any) -> Iterator[NetnsFederation]:
    """:meth:`NetnsFederation.create`, closed on exit whatever happens."""
    fed = NetnsFederation.create(directory, n, **kwargs)
    try:
        yield fed
    finally:
        fed.close()


# ====================================================================== operator helper


def _emit(event: Mapping[str, object]) -> None:
    print(json.dumps(event), flush=True)


def _operate(spec_path: Path) -> int:
    """Run in the operator's namespace: propose, start, wait; events on stdout."""
    from peer.operator import OperatorClient
    from peer.wire import peer_pb2 as pb

    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    proposal = SessionProposal.from_document(spec["proposal"])

    async def go() -> None:
        client = OperatorClient.from_files(
            spec["operator"],
            Path(spec["cert"]),
            Path(spec["key"]),
            Path(spec["ca"]),
            Path(spec["roster"]),
        )
        # A partitioned peer never answers: each poll must give up on it quickly.
        client.timeout = float(spec["rpc_timeout"])
        try:
            await client.propose(proposal)
            await client.start(proposal.session_id, proposal.participants)
            _emit({"event": "started"})
            statuses = await client.wait(
                proposal.session_id,
                proposal.participants,
                timeout=float(spec["timeout"]),
                require_all=bool(spec["require_all"]),
            )
        finally:
            await client.close()
        _emit(
            {
                "event": "done",
                "states": {
                    p: s.state if isinstance(s, pb.SessionStatus) else f"{type(s).__name__}: {s}"
                    for p, s in statuses.items()
                },
            }
        )

    try:
        asyncio.run(go())
    except Exception as error:
        _emit({"event": "error", "message": f"{type(error).__name__}: {error}"})
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    operate = commands.add_parser("operate", help="propose, start and wait for a session")
    operate.add_argument("spec", type=Path)
    args = parser.parse_args(argv)
    return _operate(args.spec)


if __name__ == "__main__":
    sys.exit(main())
