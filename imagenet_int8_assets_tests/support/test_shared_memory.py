"""The per-test cleanup of StreamingDataset's shared memory spares another pytest process's: the
suite runs in several pytest processes at once (pytest-xdist), all sharing /dev/shm."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from imagenet_int8_assets_tests.support.shared_memory import (
    registered_folders,
    release_streaming_segments,
    streaming_segments,
)


def _dataset(root: Path):
    from streaming import MDSWriter

    from imagenet_int8_assets.core.dataset.mds import open_streaming

    with MDSWriter(out=str(root / "mds"), columns={"x": "bytes"}) as writer:
        for i in range(3):
            writer.write({"x": np.full(4, i, np.uint8).tobytes()})
    dataset = open_streaming(local=str(root / "mds"), batch_size=1, shuffle=False)
    assert dataset[2]["x"] == bytes([2] * 4)
    return dataset


def _prefixes(names: set[str]) -> set[str]:
    return {name[:6] for name in names}


def test_cleanup_unlinks_this_tests_segments_and_spares_another_pytest_processs(tmp_path, tmp_path_factory):
    basetemp = tmp_path_factory.getbasetemp().resolve()
    pytest_root = next(p for p in basetemp.parents if p.name.startswith("pytest-of-"))
    theirs_root = Path(tempfile.mkdtemp(prefix="pytest-other-", dir=pytest_root))  # another session's temp
    before = streaming_segments()
    try:
        ours = _dataset(tmp_path)
        ours_new = streaming_segments() - before
        theirs = _dataset(theirs_root)
        theirs_new = streaming_segments() - before - ours_new
        (ours_prefix,), (theirs_prefix,) = _prefixes(ours_new), _prefixes(theirs_new)
        assert registered_folders(ours_prefix) == [tmp_path / "mds"]
        assert registered_folders(theirs_prefix) == [theirs_root / "mds"]

        release_streaming_segments(before, basetemp)
        left = streaming_segments()
        assert not ours_new & left  # this test's: garbage once it ends
        assert theirs_new <= left  # under another pytest process's temp root: theirs, kept

        release_streaming_segments(before, theirs_root)  # as that process sees them: its own
        assert not theirs_new & streaming_segments()
        del ours, theirs
    finally:
        shutil.rmtree(theirs_root, ignore_errors=True)
