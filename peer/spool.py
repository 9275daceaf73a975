"""Private temporary files for the masked inputs an aggregator has summed (secagg.streaming).

The aggregator adds each masked input into its running sum as it arrives and writes it here,
so that its memory stays O(m) whatever the number of peers, while a later stage can still
read one input back (to take it out of the sum, to publish it, to evaluate a check on it).

The files hold masked vectors only, which reveal nothing without the masks; they are still
kept private: a directory of mode 0700 made by :func:`tempfile.mkdtemp`, files created with
mode 0600 and ``O_EXCL``, named by a counter (never by a peer id, which a peer chooses), and
all removed by :meth:`FileSpool.close` when the round ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

from secagg.streaming import SpoolWriter

__all__ = ["FileSpool", "spool_directory"]

_PREFIX = "secagg-spool-"


def spool_directory(parent: Path) -> Path:
    """The peer's spool directory under its data directory, made private, and emptied of
    spools a killed process left behind (masked vectors of rounds long over)."""
    directory = parent / "spool"
    directory.mkdir(mode=0o700, exist_ok=True)
    directory.chmod(0o700)
    for stale in directory.glob(_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    return directory


class _FileEntry:
    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
        )
        self._file = os.fdopen(fd, "wb")

    def write(self, data: memoryview, /) -> None:
        self._file.write(data)

    def finish(self) -> None:
        if not self._file.closed:
            self._file.close()


class FileSpool:
    """A :class:`secagg.streaming.VectorSpool` of private temporary files.

    Args:
        parent: where to make the spool's directory (default: the system's temp dir).
    """

    def __init__(self, parent: Path | None = None) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=parent))  # mode 0700
        self._entries: dict[str, _FileEntry] = {}
        self._count = 0
        # A backstop if close() is never reached (a crashed round, interpreter exit).
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, True)

    def create(self, sender: str) -> SpoolWriter:
        self.discard(sender)
        self._count += 1
        entry = self._entries[sender] = _FileEntry(self.directory / f"{self._count}.vec")
        return entry

    def read(self, sender: str, chunk_bytes: int) -> Iterator[bytes]:
        entry = self._entries[sender]
        entry.finish()  # flushed: whatever was written is in the file
        with entry.path.open("rb") as handle:
            while piece := handle.read(chunk_bytes):
                yield piece

    def discard(self, sender: str) -> None:
        entry = self._entries.pop(sender, None)
        if entry is not None:
            entry.finish()
            entry.path.unlink(missing_ok=True)

    def close(self) -> None:
        for sender in list(self._entries):
            self.discard(sender)
        self._cleanup()  # removes the directory, once
