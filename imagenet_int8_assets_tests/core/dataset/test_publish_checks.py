"""The checks before publishing (core.dataset.publish_checks) on real MDS class versions."""

from __future__ import annotations

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.dataset.publish_checks import NotPublishable, check_publishable, count_rows


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
    checked = check_publishable(root, ["a", "b"], {"a": 3, "b": 2})
    infos = checked.infos
    assert sorted(infos) == ["a", "b"] and infos["a"]["count"] == 3 and infos["b"]["seed"] == 0
    assert checked.versions == {k: mds_index.current_version_dir(root, k) for k in ("a", "b")}
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
    assert sorted(check_publishable(root, ["a", "b"], {"a": 3}).infos) == ["a", "b"]


def test_damaged_shards_stop_the_publication(root):
    version = mds_index.current_version_dir(root, "b")
    shard = next(version.glob("*.mds"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(NotPublishable, match="missing or damaged") as info:
        check_publishable(root, ["a", "b"], {"a": 3, "b": 2})
    assert "class b:" in str(info.value) and "class a:" not in str(info.value)
    assert "The published dataset is unchanged" in str(info.value)


def test_the_merge_uses_the_versions_that_were_checked_not_those_current_later(root):
    """Another run may move a class's current.json (a rebuild with another seed) between the check and
    the merge: the dataset is merged from the checked versions, never a mix of checked and unchecked."""
    checked = check_publishable(root, ["a", "b"], {"a": 3, "b": 2})
    _write(root, "b", 2, seed=1)  # b re-made with another seed after the check
    assert mds_index.current_version_dir(root, "b") != checked.versions["b"]
    index, summary = mds_index.merged_index(root, ["a", "b"], checked.versions)
    assert summary["versions"]["b"] == checked.versions["b"].relative_to(root).as_posix()
    merged = {e["raw_data"]["basename"].rsplit("/", 1)[0] for e in index["shards"]}
    assert merged == {v.relative_to(root).as_posix() for v in checked.versions.values()}
