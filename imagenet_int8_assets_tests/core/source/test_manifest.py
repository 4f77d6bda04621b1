"""core.source.manifest: reading the last scan's manifest and class list, on real files."""

import pandas as pd
import pytest

from imagenet_int8_assets.core.common.files import atomic_write_json
from imagenet_int8_assets.core.common.layout import MissingArtifact, manifest_path, mds_root, source_classes_path
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.source.manifest import (
    COUNT_COLUMNS,
    ManifestRefusal,
    dataset_classes,
    ok_counts_by_class,
    ok_rows_by_class,
    previous_manifest,
    read_manifest,
    read_source_classes,
    recorded_labels,
    require_classes_in_source,
    require_usable_images,
)

FRAME = pd.DataFrame({
    "id": ["a/1.jpg", "a/2.jpg", "a/3.jpg", "b/1.jpg", "junk"],
    "class_folder": ["a", "a", "a", "b", ""],
    "status": ["ok", "bad", "ok", "skipped", "ok"],
    "reason": ["", "truncated", "", "too small", ""],
})


def _write_manifest(output, frame=FRAME):
    path = manifest_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)


def _write_classes(output, classes, labels):
    atomic_write_json(
        source_classes_path(output),
        {"classes": classes, "labels": labels, "versions": {k: "v" for k in classes}, "vanished": []},
    )


def test_good_images_are_counted_from_two_columns_of_the_manifest(tmp_path):
    _write_manifest(tmp_path)
    counts = read_manifest(tmp_path, COUNT_COLUMNS)
    assert list(counts.columns) == list(COUNT_COLUMNS) and len(counts) == 5
    assert list(read_manifest(tmp_path).columns) == list(FRAME.columns)
    assert ok_counts_by_class(counts, ["a", "b", "c"]) == {"a": 2, "b": 0, "c": 0}
    rows = ok_rows_by_class(read_manifest(tmp_path), ["a", "b"])
    assert list(rows["a"]["id"]) == ["a/1.jpg", "a/3.jpg"] and rows["b"].empty


def test_a_missing_manifest_or_class_list_says_to_materialize_raw_manifest(tmp_path):
    with pytest.raises(MissingArtifact, match="Materialize 'raw_manifest' first"):
        read_manifest(tmp_path)
    with pytest.raises(MissingArtifact, match="No class list"):
        read_source_classes(tmp_path)
    assert previous_manifest(tmp_path) is None
    manifest_path(tmp_path).parent.mkdir(parents=True)
    manifest_path(tmp_path).write_bytes(b"not parquet")
    assert previous_manifest(tmp_path) is None  # a damaged manifest is rebuilt, not an error
    _write_manifest(tmp_path)
    assert previous_manifest(tmp_path).equals(FRAME)


def test_no_usable_images_is_refused_with_the_manifest_counts():
    require_usable_images(FRAME)  # one ok file is enough
    nothing = FRAME.assign(status=["bad", "bad", "skipped", "skipped", "bad"])
    with pytest.raises(ManifestRefusal) as refused:
        require_usable_images(nothing)
    assert str(refused.value).startswith(
        "No usable images: the manifest lists 5 file(s) in 2 class folder(s), 0 ok, 3 bad, 2 skipped, so there is"
    )


def test_labels_and_source_membership_come_from_the_last_scan(tmp_path):
    _write_classes(tmp_path, ["a", "b"], {"a": [0, "apple"], "b": [1, "bear"], "gone": [2, "gone"]})
    labels = recorded_labels(tmp_path, ["gone", "a"])  # a vanished class keeps its label
    assert labels.index == {"gone": 2, "a": 0} and labels.text == {"gone": "gone", "a": "apple"}
    assert labels.scheme == "recorded"
    with pytest.raises(ManifestRefusal, match=r"^No label for class\(es\) other: they are not in the source"):
        recorded_labels(tmp_path, ["a", "other"])
    require_classes_in_source(tmp_path, ["b", "a"])
    with pytest.raises(ManifestRefusal, match=r"^2 class\(es\) are not in the source scanned by raw_manifest: gone, x\."):
        require_classes_in_source(tmp_path, ["a", "gone", "x"])


def test_registered_classes_split_into_present_vanished_and_foreign(tmp_path):
    _write_classes(tmp_path, ["b", "a"], {"a": [0, "a"], "b": [1, "b"]})
    home = mds_index.class_home(mds_root(tmp_path), "gone")  # built here, then its folder vanished
    home.mkdir(parents=True)
    atomic_write_json(home / mds_index.CURRENT, {"version": "x", "class": "gone"})
    split = dataset_classes(tmp_path, ["a", "gone", "elsewhere"])
    assert (split.present, split.vanished, split.foreign) == (["a", "b"], ["gone"], ["elsewhere"])
    assert split.in_dataset == ["a", "b", "gone"]
