"""Folder scanning, labels, and manifest statuses on real files."""

from __future__ import annotations

import re

import pytest

from imagenet_int8_assets.core.source.sources import (
    ClassLabels,
    SourceError,
    class_data_versions,
    class_labels,
    imagenet_classes,
    list_class_folders,
    probe_image,
    resolve_source_root,
    scan_source,
)
from imagenet_int8_assets.sample import generate_sample_dataset
from imagenet_int8_assets_tests.support.builds import make_image_folder


def test_imagenet_table_is_the_ilsvrc_2012_order():
    table = imagenet_classes()
    wnids = [row[0] for row in table]
    assert len(table) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    assert table[0] == ("n01440764", "tench", "tench, Tinca tinca")
    assert table[402][0] == "n02676566" and table[402][2] == "acoustic guitar"


def test_wnid_folders_get_their_imagenet_index_even_for_a_subset():
    labels = class_labels(["n02676566", "n01440764"])
    assert labels.scheme == "imagenet"
    assert labels.index == {"n01440764": 0, "n02676566": 402}
    assert labels.text["n02676566"] == "acoustic guitar"
    assert labels.text["n01440764"] == "tench, Tinca tinca"


def test_other_folders_use_sorted_order_and_their_names():
    labels = class_labels(["zebra", "apple", "mango"])
    assert labels.scheme == "folder-order"
    assert labels.index == {"apple": 0, "mango": 1, "zebra": 2}
    assert labels.text["mango"] == "mango"


def test_mixed_folders_fall_back_to_sorted_order_without_collisions():
    labels = class_labels(["n01440764", "cats"])
    assert labels.scheme == "folder-order"
    assert sorted(labels.index.values()) == [0, 1]
    assert "1 of 2 folders are wnids" in labels.note


def test_source_root_accepts_imagenet_root_with_train(tmp_path):
    make_image_folder(tmp_path / "imagenet" / "train", {"n01440764": 1, "n01443537": 1})
    (tmp_path / "imagenet" / "val").mkdir()
    assert resolve_source_root(tmp_path / "imagenet") == tmp_path / "imagenet" / "train"
    assert list_class_folders(tmp_path / "imagenet") == ["n01440764", "n01443537"]


def test_missing_or_empty_sources_say_what_to_do(tmp_path):
    with pytest.raises(SourceError, match="IMAGENET_INT8_SOURCE"):
        resolve_source_root(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="one subfolder per class"):
        list_class_folders(tmp_path / "empty")


def test_sample_manifest_records_every_bad_file_with_a_reason(tmp_path):
    root = generate_sample_dataset(tmp_path / "sample")
    frame, labels = scan_source(root, workers=1)
    by_id = frame.set_index("id")
    assert labels.scheme == "imagenet"
    assert set(frame["class_folder"]) == {"n01440764", "n02102040", "n02979186", "n03000684"}
    expected = {
        "n01440764/n01440764_0006.JPEG": ("bad", "empty file"),
        "n02102040/n02102040_0006.JPEG": ("bad", "truncated"),
        "n02979186/n02979186_0006.JPEG": ("bad", "not a readable image"),
        "n02979186/README.txt": ("skipped", "not an image file"),
        "n03000684/n03000684_0007.png": ("bad", "decompression bomb"),
    }
    for image_id, (status, reason) in expected.items():
        assert by_id.loc[image_id, "status"] == status
        assert reason in by_id.loc[image_id, "reason"]
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == len(frame) - len(expected)
    assert (ok["reason"] == "").all() and (ok["width"] > 0).all()
    modes = set(ok["mode"])
    assert {"RGB", "L", "CMYK", "P", "RGBA"} <= modes and any(m.startswith("I") for m in modes)
    assert "n03000684/n03000684_café_ñ_0006.JPEG" in set(ok["id"])
    assert by_id.loc["n02979186/n02979186_0005.JPEG", "format"] == "PNG"  # PNG behind .JPEG
    assert (frame["label"] == frame["class_folder"].map(labels.index)).all()


def test_parallel_scan_equals_serial_scan(tmp_path):
    root = make_image_folder(tmp_path / "src", {"a": 40, "b": 30})
    serial, _ = scan_source(root, workers=1)
    parallel, _ = scan_source(root, workers=2)
    assert serial.equals(parallel) and len(serial) == 70


def test_probe_hidden_and_unreadable(tmp_path):
    hidden = tmp_path / ".DS_Store"
    hidden.write_bytes(b"\0\1")
    assert probe_image(hidden)["status"] == "skipped"
    assert probe_image(tmp_path / "missing.JPEG")["status"] == "bad"


def _version_frame():
    import pandas as pd

    from imagenet_int8_assets.core.source.sources import MANIFEST_COLUMNS

    rows = [
        ("a/x.jpg", "a", 10, 5, "ok", ""),
        ("a/b\udcff.jpg", "a", 11, 6, "bad", "truncated"),
        ("a/Z.jpg", "a", 12, 7, "skipped", "too small"),
        ("b/1.png", "b", 0, -1, "bad", "empty file"),
        ("junk.txt", "", 3, 1, "skipped", "not a class"),
        ("c/é.jpg", "c", 2**40, 1700000000123456789, "ok", ""),
    ]
    records = [
        {c: 0 if c in ("label", "width", "height") else "" for c in MANIFEST_COLUMNS}
        | dict(zip(["id", "class_folder", "bytes", "mtime_ns", "status", "reason"], row))
        for row in rows
    ]
    frame = pd.DataFrame(records, columns=MANIFEST_COLUMNS).astype({"bytes": "int64", "mtime_ns": "int64"})
    labels = ClassLabels("folder-order", {"a": 0, "b": 1, "c": 2, "d": 3}, {"a": "A", "b": "B", "c": "C", "d": "D"}, "")
    return frame, labels


def test_class_data_versions_follow_each_class_files_and_label_only():
    frame, labels = _version_frame()
    versions = class_data_versions(frame, labels)
    # the versions earlier releases recorded for these files: an upgrade must not mark classes changed
    assert versions == {"a": "511cbf2957cf7001ff8cc1e2", "b": "f4da05e99d24c2f862ddb0fa", "c": "d90426a40327fd40335cdb1c", "d": "efc438b740240c1a48432179"}
    assert class_data_versions(frame.sample(frac=1, random_state=1), labels) == versions  # row order is not a change
    for column, value in (("bytes", 99), ("mtime_ns", 99), ("status", "bad"), ("reason", "x"), ("id", "a/y.jpg")):
        changed = frame.copy()
        changed.loc[changed["id"] == "a/x.jpg", column] = value
        assert class_data_versions(changed, labels) == versions | {"a": class_data_versions(changed, labels)["a"]}
        assert class_data_versions(changed, labels)["a"] != versions["a"], column
    relabeled = ClassLabels("folder-order", {**labels.index, "b": 7}, labels.text, "")
    assert class_data_versions(frame, relabeled) == versions | {"b": class_data_versions(frame, relabeled)["b"]} != versions
    emptied = class_data_versions(frame[frame["id"] != "c/é.jpg"], labels)
    assert emptied["c"] != versions["c"] and emptied["c"] == class_data_versions(frame.iloc[0:0], labels)["c"]
