"""Folder scanning, labels, and manifest statuses on real files."""

from __future__ import annotations

import re

import pytest

from imagenet_int8_assets.core.sources import (
    SourceError,
    class_labels,
    imagenet_classes,
    list_class_folders,
    probe_image,
    resolve_source_root,
    scan_source,
)
from imagenet_int8_assets.sample import generate_sample_dataset
from imagenet_int8_assets_tests.conftest import make_image_folder


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
