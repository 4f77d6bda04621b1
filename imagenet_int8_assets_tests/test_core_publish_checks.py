"""The checks before publishing (core.publish_checks) on real MDS class versions."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core import mds, mds_index
from imagenet_int8_assets.core.publish_checks import NotPublishable, check_publishable, count_rows


def _write(root, name, n, seed=0, **info):
    codes = np.random.default_rng(n).integers(0, 256, (n, 4, 32, 32), dtype=np.uint8)
    return mds.write_class_shards(root, name, codes, 0, name, {"seed": seed, **info})


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "mds"
    _write(root, "a", 3)
    _write(root, "b", 2)
    return root


def test_consistent_classes_with_their_counts_pass_and_give_their_build_infos(root):
    infos = check_publishable(root, ["a", "b"], {"a": 3, "b": 2})
    assert sorted(infos) == ["a", "b"] and infos["a"]["count"] == 3 and infos["b"]["seed"] == 0
    assert count_rows(root, {"a": 3, "b": 5}, ["a", "b"]) == [
        {"partition": "a", "manifest_ok": 3, "mds_samples": 3},
        {"partition": "b", "manifest_ok": 5, "mds_samples": 2},
    ]


def test_a_class_without_shards_is_named(root):
    with pytest.raises(NotPublishable, match=r"mds_shards is not materialized for 1 class\(es\): c\. Materialize"):
        check_publishable(root, ["a", "b", "c"], {"a": 3, "b": 2, "c": 1})


def test_classes_built_with_other_settings_cannot_be_published(root):
    _write(root, "c", 1, seed=7)
    with pytest.raises(NotPublishable, match="different settings") as info:
        check_publishable(root, ["a", "b", "c"], {"a": 3, "b": 2, "c": 1})
    assert "seed" in str(info.value) and "Re-materialize the minority classes" in str(info.value)


def test_count_mismatch_names_the_class_and_both_counts(root):
    with pytest.raises(NotPublishable, match=r"for: b \(2 written, 4 ok\)\. Re-materialize raw_manifest"):
        check_publishable(root, ["a", "b"], {"a": 3, "b": 4})


def test_a_class_missing_from_the_manifest_counts_is_kept_without_comparison(root):
    """A class that vanished from the source has no manifest rows: its last build is kept as it is."""
    infos = check_publishable(root, ["a", "b"], {"a": 3})
    assert sorted(infos) == ["a", "b"]


def test_damaged_shards_stop_the_publication(root):
    version = mds_index.current_version_dir(root, "b")
    shard = next(version.glob("*.mds"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(NotPublishable, match="missing or damaged") as info:
        check_publishable(root, ["a", "b"], {"a": 3, "b": 2})
    assert "class b:" in str(info.value) and "class a:" not in str(info.value)
    assert "The published dataset is unchanged" in str(info.value)
