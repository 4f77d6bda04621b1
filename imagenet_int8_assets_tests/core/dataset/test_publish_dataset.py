"""The dataset stage (core.dataset.publish_dataset) without Dagster, on real MDS class versions."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.dataset.publish_checks import NotPublishable
from imagenet_int8_assets.core.dataset.publish_dataset import publish_dataset


def _write(root, name, n, label, seed=0):
    codes = np.random.default_rng(n + label).integers(0, 256, (n, 4, 8, 8), dtype=np.uint8)
    return mds.write_class_shards(root, name, codes, label, f"class {name}", {"seed": seed})


def test_publishing_writes_the_merged_index_reads_back_and_sweeps_old_versions(tmp_path):
    root = tmp_path / "mds"
    _write(root, "a", 3, 0)
    old_b = _write(root, "b", 1, 1)
    new_b = _write(root, "b", 2, 1)  # rebuilt: the first version is no longer current
    (root / "notes.txt").write_text("not the dataset's")
    lines: list[str] = []

    done = publish_dataset(root, ["a", "b"], {"a": 3, "b": 2}, info=lines.append)

    assert done.published and done.keys == ["a", "b"]
    assert done.summary["samples"] == 5 and done.summary["per_class"] == {"a": 3, "b": 2}
    assert done.first["seed"] == 0 and done.mirrored is None and not lines  # no remote, nothing to log
    record = mds_index.published_record(root)
    assert record["per_class"] == {"a": 3, "b": 2} and record["samples"] == 5
    assert record["versions"]["b"] == new_b.relative_to(root).as_posix()
    assert mds_index.read_published_index(root)["shards"] == done.index["shards"]
    on_disk = sum((new_b / s["raw_data"]["basename"]).stat().st_size for s in mds_index.read_index(new_b)["shards"])
    a_version = mds_index.current_version_dir(root, "a")
    on_disk += sum((a_version / s["raw_data"]["basename"]).stat().st_size for s in mds_index.read_index(a_version)["shards"])
    assert done.bytes == on_disk
    assert mds.verify_readable(root)["samples"] == 5
    assert not old_b.exists() and done.removed  # the version no index refers to is swept
    assert "notes.txt" in done.strays and (root / "notes.txt").exists()  # named, left alone

    again = publish_dataset(root, ["a", "b"], {"a": 3, "b": 2})
    assert not again.published and again.summary == done.summary  # the same index: nothing rewritten


def test_an_unpublishable_class_set_raises_and_publishes_nothing(tmp_path):
    root = tmp_path / "mds"
    _write(root, "a", 3, 0)
    _write(root, "b", 2, 1, seed=7)  # built with other settings

    with pytest.raises(NotPublishable, match="different settings"):
        publish_dataset(root, ["a", "b"], {"a": 3, "b": 2})
    with pytest.raises(NotPublishable, match=r"for: a \(3 written, 4 ok\)"):
        publish_dataset(root, ["a"], {"a": 4})

    assert mds_index.published_record(root) is None and not (root / "index.json").exists()
