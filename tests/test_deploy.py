"""Deployment files: the entrypoint as a plain process, the systemd unit, the container image.

The entrypoint (``deploy/peer-site``) is what both the image and the systemd unit run, so it
is tested here directly, with a kit and a state folder in a temp directory. The unit is
checked with ``systemd-analyze verify`` and ``security --offline``. The image is built and
run against the machine's container engine, or one the test starts (as root) and stops again,
on a Python 3.11 base it makes with debootstrap when none can be pulled; without docker or
root it is skipped with the reason (failed in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from peer.kit import LocalKit

ROOT = Path(__file__).resolve().parent.parent
ENTRYPOINT = ROOT / "deploy" / "peer-site"
UNIT = ROOT / "deploy" / "systemd" / "hospital-peer@.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "hospital-peer.sysusers.conf"
PEER_BIN = Path(sys.executable).with_name("peer")
KIT_FILES = ("ca.pem", "crl.pem", "roster.json", "roster.json.sig", "ROOT_FINGERPRINT.txt")
ME = "hospital-a"


@pytest.fixture
def kit(tmp_path: Path) -> LocalKit:
    return LocalKit.create(tmp_path / "fed", [ME, "hospital-b", "hospital-c"])


def make_site(kit: LocalKit, root: Path, peer_id: str = ME) -> tuple[Path, Path]:
    """The kit folder exactly as `ceremony kit` leaves it (no databases), and an empty state
    folder."""
    source = kit.kits[peer_id].directory
    kit_dir, state = root / "kit", root / "state"
    root.mkdir(parents=True, exist_ok=True)
    kit_dir.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    for name in (*KIT_FILES, f"{peer_id}.toml", f"{peer_id}.pem", f"{peer_id}.key"):
        shutil.copy2(source / name, kit_dir / name)
    return kit_dir, state


def site_env(kit_dir: Path, state: Path, **extra: str) -> dict[str, str]:
    assert PEER_BIN.exists(), f"the peer console script is not installed at {PEER_BIN}"
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PEER_KIT": str(kit_dir),
        "PEER_STATE": str(state),
        "PEER_BIN": str(PEER_BIN),
        **extra,
    }


def run_site(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(ENTRYPOINT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# --------------------------------------------------------------------------- entrypoint


def test_entrypoint_starts_a_peer_from_a_read_only_kit(
    kit: LocalKit, tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    kit_dir, state = make_site(kit, tmp_path)
    before = {p.name: p.read_bytes() for p in kit_dir.iterdir()}
    process = subprocess.Popen(
        ["/bin/sh", str(ENTRYPOINT), "start"],
        env=site_env(kit_dir, state),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started.append(process)
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, process.stderr.read() if process.stderr else ""
    event = json.loads(line)
    assert event["event"] == "ready"
    assert event["peer"] == ME
    # The databases are in the state folder; the kit is only linked, never written.
    assert (state / "ledger.db").exists()
    assert (state / f"{ME}.toml").is_symlink()
    assert (state / f"{ME}.toml").resolve() == kit_dir / f"{ME}.toml"
    assert {p.name: p.read_bytes() for p in kit_dir.iterdir()} == before
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_entrypoint_runs_doctor_on_the_same_layout(kit: LocalKit, tmp_path: Path) -> None:
    kit_dir, state = make_site(kit, tmp_path)
    done = run_site(site_env(kit_dir, state), "doctor", "--json")
    report = json.loads(done.stdout)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["ledger database"]["status"] == "OK"
    assert str(state / "ledger.db") in checks["ledger database"]["message"]
    assert checks["certificate"]["status"] == "OK"
    # The other peers are not running here: doctor fails on that, and says so.
    assert done.returncode == 1
    assert checks["peers"]["status"] == "FAIL"


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("no kit", "no kit folder at"),
        ("no key", "no private key"),
        ("no state", "no state folder at"),
        ("two configs", "several configs"),
        ("wrong id", "does not match the kit"),
        ("state file in the way", "is not a link into the kit"),
    ],
)
def test_entrypoint_refuses_a_bad_layout_with_a_clear_error(
    kit: LocalKit, tmp_path: Path, breakage: str, message: str
) -> None:
    kit_dir, state = make_site(kit, tmp_path)
    extra: dict[str, str] = {}
    if breakage == "no kit":
        shutil.rmtree(kit_dir)
    elif breakage == "no key":
        (kit_dir / f"{ME}.key").unlink()
    elif breakage == "no state":
        state.rmdir()
    elif breakage == "two configs":
        shutil.copy(kit_dir / f"{ME}.toml", kit_dir / "hospital-z.toml")
    elif breakage == "wrong id":
        extra["PEER_ID"] = "hospital-b"
    elif breakage == "state file in the way":
        (state / "roster.json").write_text("{}", encoding="utf-8")
    done = run_site(site_env(kit_dir, state, **extra), "start")
    assert done.returncode == 2
    # (a warning that the kit is writable may come first: tests run as root)
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("peer-site: error: ")
    assert message in last
    assert done.stdout == ""


def test_entrypoint_runs_any_other_command(tmp_path: Path) -> None:
    done = run_site(site_env(tmp_path, tmp_path), str(PEER_BIN), "--help")
    assert done.returncode == 0
    assert "doctor" in done.stdout


# --------------------------------------------------------------------------- systemd

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed on this machine",
)


def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed, with ExecStart pointing at this checkout's entrypoint (verify
    checks that the program exists and is executable)."""
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/opt/hospital-peer/bin/peer-site start" in text
    target = tmp_path / UNIT.name
    target.write_text(
        text.replace("/opt/hospital-peer/bin/peer-site", str(ENTRYPOINT)), encoding="utf-8"
    )
    return target


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = installed_unit(tmp_path)
    instance = unit.with_name("hospital-peer@hospital-a.service")
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "hospital-peer@" not in done.stderr, done.stderr  # no warning about our unit


@needs_systemd_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    # The check above is meaningful: the same verify fails on a bad value or program.
    assert SYSTEMD_ANALYZE is not None
    unit = installed_unit(tmp_path)
    text = unit.read_text(encoding="utf-8").replace(str(ENTRYPOINT), "/nonexistent/peer-site")
    unit.write_text(text, encoding="utf-8")
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit.with_name("hospital-peer@x.service"))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "/nonexistent/peer-site" in done.stderr


@needs_systemd_analyze
def test_unit_is_hardened(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    text = UNIT.read_text(encoding="utf-8")
    for setting in (
        "Restart=on-failure",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "User=hospital-peer",
        "StateDirectory=hospital-peer/%i",
        "ReadWritePaths=%S/hospital-peer/%i",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert re.search(rf"^{re.escape(setting)}$", text, re.MULTILINE), setting
    instance = installed_unit(tmp_path).with_name("hospital-peer@hospital-a.service")
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(instance)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    # systemd's scale: 0 (locked down) .. 10 (exposed); below 2 is rated "OK".
    assert float(match.group(1)) < 2.0, done.stdout


def test_sysusers_file_makes_the_service_account(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed on this machine")
    done = subprocess.run(
        [sysusers, f"--root={tmp_path}", "--dry-run", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Creating user 'hospital-peer'" in done.stdout + done.stderr


# --------------------------------------------------------------------------- container image

IMAGE = "hospital-peer:test"
IMAGE_UID = 10001
# Docker Hub may be out of reach (it is on the machines this was developed on): then the base
# is made here from Debian's mirror, which apt already uses, and cached for later runs.
HUB_BASE = "python:3.11-slim"
LOCAL_BASE = "local/debian-python:3.11-bookworm"
DEBIAN_MIRROR = os.environ.get("PEER_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# An engine this test starts keeps its images here (so the base and the layers are reused by
# the next run) and its sockets under /run; the debootstrap tarball is cached beside it.
ENGINE_HOME = Path(os.environ.get("PEER_TEST_ENGINE_HOME", "/var/lib/hospital-peer-test"))
ENGINE_RUN = Path("/run/hospital-peer-test")
BASE_TARBALL = ENGINE_HOME / "debian-python-3.11-bookworm.tar"
SBIN_PATH = os.pathsep.join((os.environ.get("PATH", ""), "/usr/sbin", "/sbin"))


def _unavailable(reason: str) -> NoReturn:
    # As for the other tests that need the machine's help: in CI, not running is a failure.
    # (`make test` installs docker.io and debootstrap as root, so CI should never get here.)
    if os.environ.get("CI"):
        pytest.fail(f"the container image test cannot run in CI: {reason}")
    pytest.skip(reason)


class Engine:
    """The docker CLI pointed at one engine (the machine's, or one this test started)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def docker(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=self.env,
        )

    def answers(self) -> bool:
        try:
            return self.docker("info", "--format", "{{.ServerVersion}}", timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def has_image(self, name: str) -> bool:
        return self.docker("image", "inspect", name, timeout=60).returncode == 0


def _start_engine(dockerd: str, log: Path) -> tuple[Engine, subprocess.Popen[bytes]]:
    """Start a dockerd of our own (own data root, exec root, socket and pidfile, so it cannot
    disturb a system engine) and wait up to 60 s for it to answer."""
    ENGINE_HOME.mkdir(parents=True, exist_ok=True)
    ENGINE_RUN.mkdir(parents=True, exist_ok=True)
    socket = ENGINE_RUN / "docker.sock"
    # fmt: off
    command = [
        dockerd,
        "--data-root", str(ENGINE_HOME / "docker"),
        "--exec-root", str(ENGINE_RUN / "exec"),
        "--pidfile", str(ENGINE_RUN / "dockerd.pid"),
        "--host", f"unix://{socket}",
    ]
    # fmt: on
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C on the test run does not reach it first
            env={**os.environ, "PATH": SBIN_PATH},
        )
    engine = Engine({**os.environ, "DOCKER_HOST": f"unix://{socket}"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if socket.exists() and engine.answers():
            return engine, process
        time.sleep(1)
    _stop_engine(process)
    tail = log.read_text(encoding="utf-8", errors="replace")[-1500:]
    _unavailable(f"the dockerd this test started did not answer within 60 s; its log ends:\n{tail}")


def _stop_engine(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()  # dockerd stops its containers and its containerd on SIGTERM
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    # dockerd leaves its default network namespace bind-mounted under the exec root; unmount
    # it so nothing of this test stays mounted.
    mounts = Path("/proc/mounts").read_text(encoding="utf-8").splitlines()
    for target in reversed([line.split()[1] for line in mounts]):
        if target.startswith(f"{ENGINE_RUN}/"):
            subprocess.run(["umount", target], capture_output=True, timeout=60, check=False)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A container engine that answers: the machine's if one runs, else one started here (as
    root, when dockerd is installed) and stopped again at the end of the session."""
    if shutil.which("docker") is None:
        _unavailable("no docker CLI on PATH (scripts/install_system_deps.sh installs docker.io)")
    system = Engine(dict(os.environ))
    if system.answers():
        yield system
        return
    own = Engine({**os.environ, "DOCKER_HOST": f"unix://{ENGINE_RUN / 'docker.sock'}"})
    if own.answers():  # left running by an interrupted earlier run: use it, and stop it below
        yield own
        pid = ENGINE_RUN / "dockerd.pid"
        if pid.exists():
            os.kill(int(pid.read_text(encoding="ascii").strip()), signal.SIGTERM)
        return
    dockerd = shutil.which("dockerd", path=SBIN_PATH)
    if dockerd is None:
        _unavailable("no container engine answers `docker info` and dockerd is not installed")
    if os.geteuid() != 0:
        _unavailable("no container engine answers `docker info`, and starting one needs root")
    log = tmp_path_factory.mktemp("engine") / "dockerd.log"
    started, process = _start_engine(dockerd, log)
    try:
        yield started
        # Each run re-tags hospital-peer:test; drop the images it replaced (about 2 GB each)
        # so the data root does not grow run after run. The base and layers in use stay.
        started.docker("image", "prune", "--force", timeout=600)
    finally:
        _stop_engine(process)


def _debootstrap_base(engine: Engine, work: Path) -> None:
    """Make LOCAL_BASE: a minimal Debian bookworm with Python 3.11 and venv, from the Debian
    mirror. The rootfs tarball is cached in BASE_TARBALL, so this runs once per machine."""
    if not BASE_TARBALL.exists():
        debootstrap = shutil.which("debootstrap", path=SBIN_PATH)
        if debootstrap is None:
            _unavailable(
                f"no base image ({HUB_BASE} cannot be pulled, {LOCAL_BASE} is absent) and "
                "debootstrap is not installed to make one"
            )
        if os.geteuid() != 0:
            _unavailable(f"making the base image {LOCAL_BASE} with debootstrap needs root")
        rootfs = work / "rootfs"
        # fmt: off
        made = subprocess.run(
            [debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), DEBIAN_MIRROR],
            capture_output=True, text=True, timeout=1200, check=False,
            env={**os.environ, "PATH": SBIN_PATH},
        )
        # fmt: on
        assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
        shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        BASE_TARBALL.parent.mkdir(parents=True, exist_ok=True)
        partial = BASE_TARBALL.with_suffix(".partial")
        subprocess.run(
            ["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."],
            check=True,
            timeout=600,
        )
        partial.rename(BASE_TARBALL)  # only a complete tarball is ever cached
        shutil.rmtree(rootfs)
    imported = engine.docker("import", str(BASE_TARBALL), LOCAL_BASE, timeout=600)
    assert imported.returncode == 0, imported.stderr


def base_image(engine: Engine, work: Path) -> str:
    """The Python 3.11 image to build on: PEER_IMAGE_BASE if set; else python:3.11-slim if the
    engine has it or can pull it; else the Debian base made by debootstrap."""
    chosen = os.environ.get("PEER_IMAGE_BASE")
    if chosen:
        if not engine.has_image(chosen) and engine.docker("pull", chosen).returncode != 0:
            _unavailable(f"PEER_IMAGE_BASE={chosen} is not in the engine and cannot be pulled")
        return chosen
    for present in (HUB_BASE, LOCAL_BASE):
        if engine.has_image(present):
            return present
    try:
        if engine.docker("pull", HUB_BASE, timeout=120).returncode == 0:
            return HUB_BASE
    except subprocess.TimeoutExpired:
        pass
    _debootstrap_base(engine, work)
    return LOCAL_BASE


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a cold machine: start an engine, debootstrap a base, fetch wheels
def test_container_image_builds_and_runs_a_peer(
    engine: Engine, kit: LocalKit, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        _unavailable("the test gives the kit to the image's uid 10001, which needs root")
    base = base_image(engine, tmp_path)
    # An offline build: the context is a copy of what .dockerignore lets in, plus wheels of
    # this tree and its dependencies (pip uses its own configuration to fetch those).
    context = tmp_path / "context"
    for name in ("pyproject.toml", "setup.py", "README.md", "Dockerfile", ".dockerignore"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    for package in ("secagg", "peer", "dashboard", "scripts"):
        shutil.copytree(
            ROOT / package, context / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    (context / "deploy" / "container" / "wheels").mkdir(parents=True)
    shutil.copy2(ENTRYPOINT, context / "deploy" / "peer-site")
    wheels = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", str(context), "-w",
         str(context / "deploy" / "container" / "wheels")],
        capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    assert wheels.returncode == 0, wheels.stderr[-2000:]
    build = subprocess.run(
        ["docker", "build", "--build-arg", f"BASE={base}", "-t", IMAGE, str(context)],
        capture_output=True, text=True, timeout=1800, check=False,
        env={**engine.env, "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "0")},
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    # Runs as the unprivileged user, not root.
    whoami = engine.docker("run", "--rm", IMAGE, "id", "-u")
    assert whoami.stdout.strip() == str(IMAGE_UID), whoami.stderr
    helped = engine.docker("run", "--rm", IMAGE, "peer", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "doctor" in helped.stdout

    kit_dir, state = make_site(kit, tmp_path / "site")
    mounts = ["-v", f"{kit_dir}:/kit:ro", "-v", f"{state}:/var/lib/peer", "--network", "host"]
    # The kit still belongs to root (0700, as `ceremony kit` makes it), then only its key
    # does: each time the entrypoint says what to do.
    refused = engine.docker("run", "--rm", *mounts, IMAGE, "start")
    assert refused.returncode == 2, refused.stderr
    assert f"cannot read the kit folder /kit as uid {IMAGE_UID}" in refused.stderr
    os.chown(kit_dir, IMAGE_UID, IMAGE_UID)
    refused = engine.docker("run", "--rm", *mounts, IMAGE, "start")
    assert refused.returncode == 2, refused.stderr
    assert f"cannot read /kit/{ME}.key as uid {IMAGE_UID}" in refused.stderr
    for path in (state, kit_dir / f"{ME}.key"):
        os.chown(path, IMAGE_UID, IMAGE_UID)

    checked = engine.docker("run", "--rm", *mounts, "--read-only", IMAGE, "doctor", "--json")
    report = json.loads(checked.stdout)
    checks = {c["check"]: c["status"] for c in report["checks"]}
    assert checks["tensorflow"] == "OK", report  # TensorFlow CPU is in the image
    assert checks["certificate"] == "OK"
    assert checks["ledger database"] == "OK"
    assert checks["private key"] == "OK"

    name = f"peer-test-{os.getpid()}"
    run = engine.docker("run", "-d", "--name", name, *mounts, "--read-only", IMAGE)
    assert run.returncode == 0, run.stderr
    try:
        logs = ""
        for _ in range(120):
            logs = engine.docker("logs", name).stdout
            if '"event": "ready"' in logs:
                break
            time.sleep(1)
        assert '"event": "ready"' in logs, logs + engine.docker("logs", name).stderr
        assert (state / "ledger.db").exists()
    finally:
        engine.docker("rm", "-f", name)
