"""The edges doctor touches (clock, disk, subprocess, uid, kernel clock state), injectable."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from peer.identity import Clock, system_clock


class DiskUsage(NamedTuple):
    total: int
    used: int
    free: int


def _default_probe() -> tuple[str, ...]:
    return (sys.executable, "-c", "import tensorflow as tf; print(tf.__version__)")


@dataclass(frozen=True)
class Environment:
    """The edges doctor touches, injected so tests can fix them.

    Attributes:
        clock: the current time (certificate and CRL validity).
        disk_usage: ``shutil.disk_usage`` of a path.
        import_probe: the command whose success means TensorFlow imports (its stdout's
            last line is reported as the version).
        import_timeout: seconds before the probe is killed (a FAIL, not a hang).
        peer_timeout: seconds per peer health check.
        uid: the user doctor runs as (the key must be theirs).
        ntp_synchronized: True/False from the kernel, None when it cannot tell.
    """

    clock: Clock = system_clock
    disk_usage: Callable[[Path], DiskUsage] = field(
        default=lambda path: DiskUsage(*shutil.disk_usage(path))
    )
    import_probe: Sequence[str] = field(default_factory=_default_probe)
    import_timeout: float = 180.0
    peer_timeout: float = 5.0
    uid: int = field(default_factory=os.geteuid)
    ntp_synchronized: Callable[[], bool | None] = field(default=lambda: kernel_ntp_synchronized())


class _Timex(ctypes.Structure):
    # struct timex of <sys/timex.h> begins with ``unsigned int modes``; the rest is never
    # read here, so it is padding large enough for every architecture's layout.
    _fields_ = (("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 256))


_TIME_ERROR = 5  # adjtimex: "clock not synchronized"


def kernel_ntp_synchronized() -> bool | None:
    """Whether the kernel considers the clock synchronised (``adjtimex``), None if unknown."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        state = libc.adjtimex(ctypes.byref(_Timex()))
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return bool(state != _TIME_ERROR)
