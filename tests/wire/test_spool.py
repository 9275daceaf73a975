"""The aggregator's spool of masked inputs on disk (peer/spool.py, issue 11).

Files are private (0600 in a 0700 directory), named by a counter and not by the peer id a
peer chooses, and gone when the round ends (tests/secagg/test_streaming_sum.py has the
sum itself, and an input altered in its fragments).
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from peer.spool import FileSpool, spool_directory
from secagg.streaming import MaskedSum


def test_spool_files_are_private_and_removed_when_closed(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path)
    total = MaskedSum(1000, 32, spool)
    vectors = {u: np.full(1000, i + 1, dtype=np.uint32) for i, u in enumerate(["../x", "b"])}
    for u, vector in vectors.items():
        stream = total.stream(u)
        stream.feed(vector.tobytes())
        stream.commit()
    assert stat.S_IMODE(spool.directory.stat().st_mode) == 0o700
    files = sorted(spool.directory.iterdir())
    assert len(files) == 2
    for path in files:
        assert path.parent == spool.directory  # a peer id is never part of a path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    np.testing.assert_array_equal(total.vector("../x"), vectors["../x"])
    total.remove("b")  # leaves the sum and the disk
    assert len(list(spool.directory.iterdir())) == 1
    np.testing.assert_array_equal(total.total, vectors["../x"])
    total.close()
    assert not spool.directory.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_spool_never_closed_is_removed_when_collected(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path)
    spool.create("a").write(memoryview(b"1234"))
    directory = spool.directory
    del spool
    assert not directory.exists()


def test_the_peer_spool_directory_is_private_and_forgets_a_crashed_rounds_spool(
    tmp_path: Path,
) -> None:
    directory = spool_directory(tmp_path)
    left = FileSpool(directory)
    left.create("a").write(memoryview(b"masked words"))
    left._cleanup.detach()  # as if the process had been killed: nothing cleans up
    assert any(directory.iterdir())
    again = spool_directory(tmp_path)  # the next start of the peer
    assert again == directory
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert list(directory.iterdir()) == []
