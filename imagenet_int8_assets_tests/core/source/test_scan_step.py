"""The raw_manifest stage (core.source.scan_step) without Dagster, on real image files."""

from __future__ import annotations

import json

import pandas as pd

from imagenet_int8_assets.core.common.layout import manifest_path, mds_root, source_classes_path
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.source.manifest import read_source_classes
from imagenet_int8_assets.core.source.scan_step import scan_manifest, write_manifest
from imagenet_int8_assets_tests.support.builds import make_image_folder


def test_a_scan_writes_the_manifest_and_class_list_and_a_rescan_reuses_unchanged_rows(tmp_path):
    source = make_image_folder(tmp_path / "src", {"n01440764": 2, "n02102040": 1}, size=(64, 48))
    (source / "n02102040" / "broken.JPEG").write_bytes(b"not an image")
    out = tmp_path / "out"

    scan = scan_manifest(source, out, max_pixels=10**8, workers=1)
    path = write_manifest(out, scan)

    assert path == manifest_path(out) and scan.classes == ["n01440764", "n02102040"] and scan.vanished == []
    frame = pd.read_parquet(path)
    assert len(frame) == 4 and sorted(frame["status"]) == ["bad", "ok", "ok", "ok"]
    record = read_source_classes(out)
    assert record["classes"] == scan.classes and record["versions"] == scan.versions
    assert record["labels"]["n01440764"] == [0, "tench, Tinca tinca"]  # ImageNet ids get ImageNet labels

    again = scan_manifest(source, out, max_pixels=10**8, workers=1)
    assert again.frame.attrs["reused_rows"] == 4 and again.versions == scan.versions  # nothing decoded again


def test_a_built_class_that_left_the_source_is_kept_as_vanished(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 1, "b": 1}, size=(64, 48))
    out = tmp_path / "out"
    write_manifest(out, scan_manifest(source, out, max_pixels=10**8, workers=1))
    # b was built (it has latents): deleting its folder keeps it in the dataset as vanished
    home = mds_index.class_home(mds_root(out), "b")
    home.mkdir(parents=True)
    (home / mds_index.CURRENT).write_text("v1")
    for f in (source / "b").iterdir():
        f.unlink()
    (source / "b").rmdir()

    scan = scan_manifest(source, out, max_pixels=10**8, workers=1, registered=["a", "b"])
    write_manifest(out, scan)
    assert scan.classes == ["a"] and scan.vanished == ["b"] and "b" in scan.labels.index
    assert json.loads(source_classes_path(out).read_text())["vanished"] == ["b"]
