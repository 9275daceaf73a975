"""What a benchmark's figures were measured on, recorded with them (every bench writes it).

Its own module so that each benchmark can record it without importing :mod:`scripts.bench`,
which imports the benchmarks to register them.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import cryptography
import numpy as np

__all__ = ["machine_info"]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = "unknown"
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu == "unknown":
                    cpu = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "aes_ni": "aes" in flags,
        "vaes": "vaes" in flags,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
        "load_average_at_start": load,
    }
