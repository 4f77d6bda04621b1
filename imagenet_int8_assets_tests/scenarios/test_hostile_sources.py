"""Hostile sources: directory link loops and cross-class links, names that
are not UTF-8 or cannot be partition keys, and CIFAR-10 label names that try to become paths.
Real files and real symlinks in tmp_path; one end-to-end build through a real Dagster instance."""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from dagster._core.definitions.partitions.utils.base import INVALID_PARTITION_SUBSTRINGS

from imagenet_int8_assets.core.source.cifar import class_folder_names, export_cifar10_as_folders
from imagenet_int8_assets.core.source.sources import (
    class_labels,
    class_name_problem,
    display_name,
    find_class_folders,
    list_class_folders,
    scan_source,
)
from imagenet_int8_assets_tests.support.builds import make_image_folder

SMALL = (40, 30)


def undecodable(text: str, raw: bytes = b"\xff") -> str:
    """A file name holding bytes that are not UTF-8, as Python hands it over."""
    return text + os.fsdecode(raw)


def mkdir_undecodable(path: Path) -> Path:
    try:
        path.mkdir()
    except (OSError, UnicodeEncodeError) as exc:  # e.g. APFS refuses non-UTF-8 names
        pytest.skip(f"this file system cannot hold a name that is not UTF-8 ({exc}); nothing to test here")
    return path


def rows(frame: pd.DataFrame) -> dict[str, tuple[str, str]]:
    assert frame["id"].is_unique, frame["id"][frame["id"].duplicated()].tolist()
    return {r.id: (r.status, r.reason) for r in frame.itertuples()}


def ok_ids(frame: pd.DataFrame, folder: str | None = None) -> set[str]:
    ok = frame[frame["status"] == "ok"]
    return set(ok["id"] if folder is None else ok[ok["class_folder"] == folder]["id"])


def test_a_loop_inside_a_class_reads_each_image_once(tmp_path):
    src = make_image_folder(tmp_path / "src", {"a": 3, "b": 2}, size=SMALL)
    (src / "b" / "sub").mkdir()
    (src / "b" / "sub" / "deep.JPEG").write_bytes((src / "b" / "b_0000.JPEG").read_bytes())
    os.symlink(".", src / "a" / "loop")
    os.symlink("..", src / "b" / "sub" / "back")  # back to the class folder from below
    frame, _ = scan_source(src)
    by_id = rows(frame)
    assert ok_ids(frame) == {
        "a/a_0000.JPEG", "a/a_0001.JPEG", "a/a_0002.JPEG",
        "b/b_0000.JPEG", "b/b_0001.JPEG", "b/sub/deep.JPEG",
    }  # fmt: skip
    assert len(frame) == 8  # 6 images + 2 links recorded, nothing multiplied
    assert by_id["a/loop"][0] == "skipped"
    assert "directory link loop: a/loop -> . leads back to class a's folder" in by_id["a/loop"][1]
    assert by_id["b/sub/back"][0] == "skipped" and "directory link loop: b/sub/back -> .." in by_id["b/sub/back"][1]


def test_links_to_the_source_or_another_class_do_not_steal_images(tmp_path):
    src = make_image_folder(tmp_path / "src", {"c1": 2, "c2": 2, "c3": 1}, size=SMALL)
    os.symlink("..", src / "c1" / "up")  # the source folder: every class again
    os.symlink("../c2", src / "c1" / "c2link")  # another class's folder
    os.symlink("../c3/c3_0000.JPEG", src / "c1" / "stolen.JPEG")  # another class's file
    (src / "c3" / "sub").mkdir()
    # A hard link is indistinguishable from the file: the first path in class order keeps it.
    os.link(src / "c2" / "c2_0001.JPEG", src / "c3" / "sub" / "hardlink.JPEG")
    frame, labels = scan_source(src)
    by_id = rows(frame)
    # Every class keeps exactly its own images; c1 gains nothing from its links.
    assert ok_ids(frame, "c1") == {"c1/c1_0000.JPEG", "c1/c1_0001.JPEG"}
    assert ok_ids(frame, "c2") == {"c2/c2_0000.JPEG", "c2/c2_0001.JPEG"}
    assert ok_ids(frame, "c3") == {"c3/c3_0000.JPEG"}
    assert by_id["c1/up"] == (
        "skipped",
        "directory link loop: c1/up -> .. leads back to the source folder, which contains it; not followed",
    )
    assert by_id["c1/c2link"][0] == "skipped" and "leads to class c2's folder" in by_id["c1/c2link"][1]
    assert by_id["c1/stolen.JPEG"] == ("skipped", "same file as c3/c3_0000.JPEG (read once, under that id)")
    assert by_id["c3/sub/hardlink.JPEG"][1].startswith("same file as c2/c2_0001.JPEG")
    assert len(frame) == 9
    assert (frame["label"] == frame["class_folder"].map(labels.index)).all()


def test_links_followed_once_when_they_are_the_only_path(tmp_path):
    """Normal uses keep working: class folders that link to folders outside the source (a subset
    of ImageNet made of links), a sub-folder link to outside, and linked image files."""
    outside = make_image_folder(tmp_path / "imagenet", {"n01440764": 2, "n01443537": 3, "extra": 2}, size=SMALL)
    src = tmp_path / "subset"
    src.mkdir()
    os.symlink(outside / "n01440764", src / "n01440764")
    os.symlink(outside / "n01443537", src / "n01443537")
    real = make_image_folder(tmp_path / "src2", {"n01484850": 1}, size=SMALL)
    (src / "n01484850").mkdir()
    os.symlink(real / "n01484850" / "n01484850_0000.JPEG", src / "n01484850" / "linked.JPEG")
    os.symlink(outside / "extra", src / "n01484850" / "extra_dir")  # a folder link, read once
    os.symlink(outside / "extra", src / "n01484850" / "extra_again")  # the same folder again
    frame, labels = scan_source(src)
    by_id = rows(frame)
    assert labels.scheme == "imagenet" and list_class_folders(src) == ["n01440764", "n01443537", "n01484850"]
    assert ok_ids(frame) == {
        "n01440764/n01440764_0000.JPEG", "n01440764/n01440764_0001.JPEG",
        "n01443537/n01443537_0000.JPEG", "n01443537/n01443537_0001.JPEG", "n01443537/n01443537_0002.JPEG",
        "n01484850/linked.JPEG", "n01484850/extra_again/extra_0000.JPEG", "n01484850/extra_again/extra_0001.JPEG",
    }  # fmt: skip
    assert by_id["n01484850/extra_dir"][0] == "skipped"
    assert "leads to the folder n01484850/extra_again, which is read there" in by_id["n01484850/extra_dir"][1]


def test_class_folders_that_are_broken_looping_or_duplicate_links_are_not_classes(tmp_path):
    src = make_image_folder(tmp_path / "src", {"a": 2, "b": 1}, size=SMALL)
    (src / "a" / "sub").mkdir()
    os.symlink("self", src / "self")  # a link to itself
    os.symlink("nowhere", src / "broken")
    os.symlink("a", src / "alias")  # the same folder as class a
    os.symlink("a/sub", src / "inside")  # a folder inside class a
    os.symlink(".", src / "here")  # the source folder
    os.symlink(tmp_path, src / "above")  # a folder above the source
    (src / "README.txt").write_text("top-level files are not classes")
    found = find_class_folders(src)
    assert found.names == ["a", "b"] == list_class_folders(src)
    frame, _ = scan_source(src)
    by_id = rows(frame)
    assert ok_ids(frame) == {"a/a_0000.JPEG", "a/a_0001.JPEG", "b/b_0000.JPEG"}
    expected = {
        "self": "class folder link self -> self loops",
        "broken": "class folder link broken -> nowhere is broken",
        "alias": "class folder link alias -> a is the same folder as class a",
        "inside": "class folder link inside -> a/sub points inside class a's folder",
        "here": "class folder link here -> . leads to the source folder or a folder above it",
        "above": "leads to the source folder or a folder above it",
    }
    for name, reason in expected.items():
        assert by_id[name][0] == "skipped" and reason in by_id[name][1], by_id[name]
    not_classes = frame[frame["id"].isin(list(expected))]
    assert (not_classes["class_folder"] == "").all() and (not_classes["label"] == -1).all()
    assert len(frame) == 3 + len(expected)


def test_undecodable_names_are_bad_rows_and_everything_else_is_kept(tmp_path):
    src = make_image_folder(tmp_path / "src", {"a": 2, "b": 1}, size=SMALL)
    image = (src / "a" / "a_0000.JPEG").read_bytes()
    bad_class = mkdir_undecodable(src / undecodable("caf", b"\xe9"))  # Latin-1 "café"
    (bad_class / "x.JPEG").write_bytes(image)
    (src / "a" / undecodable("img", b"\xff\xfe.JPEG")).write_bytes(image + b"\0")
    bad_sub = mkdir_undecodable(src / "b" / undecodable("sub"))
    (bad_sub / "y.JPEG").write_bytes(image + b"\0\0")
    assert find_class_folders(src).names == ["a", "b"]
    frame, _ = scan_source(src)
    by_id = rows(frame)
    frame.to_parquet(io.BytesIO(), index=False)  # the whole manifest can be written
    assert ok_ids(frame) == {"a/a_0000.JPEG", "a/a_0001.JPEG", "b/b_0000.JPEG"}
    assert by_id["caf\\xe9"] == (
        "bad",
        "class folder name 'caf\\xe9' is not valid UTF-8 (bytes shown escaped); rename the folder to include its images",
    )
    assert by_id["a/img\\xff\\xfe.JPEG"] == (
        "bad",
        "file name is not valid UTF-8 (bytes shown escaped): rename the file to include it",
    )
    assert by_id["b/sub\\xff"][0] == "bad" and "its files were not read" in by_id["b/sub\\xff"][1]
    assert display_name(undecodable("sub")) == "sub\\xff"
    assert len(frame) == 6


def test_names_dagster_cannot_use_as_partition_keys_are_bad_and_load_fine(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    for substring in INVALID_PARTITION_SUBSTRINGS:  # what Dagster 1.13.27 refuses
        assert class_name_problem(f"x{substring}y"), repr(substring)
    assert class_name_problem("esc\x1b[0m") and class_name_problem(undecodable("x"))
    assert class_name_problem("a, b [1] | c") is None  # Dagster accepts these in static keys

    src = make_image_folder(tmp_path / "src", {"good": 1, "a, b [1]": 1}, size=SMALL)
    for name in ("dots...", "tab\there", "new\nline", "bell\a", "esc\x1b"):
        make_image_folder(src, {name: 1}, size=SMALL)
    os.symlink("loop", src / "loop")  # a class folder linking to itself used to crash loading
    settings = ImagenetInt8Settings(source=str(src), output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1)
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    keys = defs.resolve_assets_def("preprocessed_crops").partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    assert sorted(keys) == ["a, b [1]", "good"]
    frame, _ = scan_source(src)
    by_id = rows(frame)
    assert "contains '...', which Dagster reserves for partition ranges" in by_id["dots..."][1]
    assert "control character(s) U+000A" in by_id["new\nline"][1]
    assert "control character(s) U+001B" in by_id["esc\x1b"][1]
    bad = frame[frame["status"] == "bad"]
    assert set(bad["id"]) == {"dots...", "tab\there", "new\nline", "bell\a", "esc\x1b"}
    assert set(frame[frame["status"] == "ok"]["class_folder"]) == set(keys)
    assert by_id["loop"][0] == "skipped" and "loops (Too many levels of symbolic links)" in by_id["loop"][1]


def test_cifar_label_names_never_become_paths(tmp_path):
    outside = tmp_path / "abs_target"
    names = sorted(["../../escaped", str(outside), "..", ".", "a/b", "airplane", "cat", "tab\tx", "dots..."])
    folder = tmp_path / "work" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    labels = [i % len(names) for i in range(2 * len(names))]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names]}, f)
    dest = tmp_path / "work" / "out" / "cifar10_test"
    dest.parent.mkdir()
    before = {p for p in tmp_path.rglob("*")}

    export_cifar10_as_folders(folder, dest, "test")

    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == dest or dest in p.parents for p in created), sorted(created - {dest})
    assert not outside.exists() and not (tmp_path / "escaped").exists()
    folders = class_folder_names(names)
    assert "airplane" in folders and "cat" in folders  # ordinary names are kept
    assert len(set(folders)) == len(folders) and class_folder_names(names) == folders
    assert find_class_folders(dest).names == sorted(folders)
    frame, scanned = scan_source(dest)
    assert (frame["status"] == "ok").all() and len(frame) == len(labels)
    by_text = Counter(frame["label_text"])
    assert by_text == Counter(names[i] for i in labels)  # the original label text
    assert scanned.scheme == "recorded"
    assert {scanned.text[f]: scanned.index[f] for f in scanned.index} == {n: i for i, n in enumerate(names)}
    assert class_labels(list_class_folders(dest), dest).text == scanned.text


def test_ordinary_cifar_names_need_no_label_record(tmp_path):
    names = ["airplane", "automobile", "bird"]
    assert class_folder_names(names) == names
    assert class_folder_names(["..", "label_0"]) == ["label_0_", "label_0"]


@pytest.mark.slow
def test_hostile_source_builds_every_good_image_exactly_once(tmp_path):
    """A loop, a link to the source, a cross-class link, an undecodable file name and an
    undecodable class folder: the whole graph builds, each good image is in the dataset once."""
    from imagenet_int8_assets.core.common.layout import manifest_path, mds_root
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.reader import open_dataset
    from imagenet_int8_assets.resources import ImagenetInt8Settings
    from imagenet_int8_assets_tests.support.builds import materialize_all

    src = make_image_folder(tmp_path / "src", {"apple": 3, "pear": 2}, size=SMALL)
    os.symlink(".", src / "apple" / "loop")
    os.symlink("..", src / "pear" / "up")
    os.symlink("../apple", src / "pear" / "apples")
    image = (src / "apple" / "apple_0000.JPEG").read_bytes()
    (src / "pear" / undecodable("pear_", b"\xe9.JPEG")).write_bytes(image)
    bad_class = mkdir_undecodable(src / undecodable("plum", b"\xff"))
    (bad_class / "plum.JPEG").write_bytes(image)

    settings = ImagenetInt8Settings(
        source=str(src), output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1
    )
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all(defs, instance)
    assert all(r.success for r in results)
    metadata = instance.get_latest_materialization_event(dg.AssetKey("raw_manifest")).asset_materialization.metadata
    assert metadata["not_classes"].value == 1 and metadata["classes"].value == 2
    per_class = metadata["per_class"].value.splitlines()[2:]  # below the header: one line per class
    assert [line.split(" | ")[0] for line in per_class] == ["| apple", "| pear"]

    manifest = pd.read_parquet(manifest_path(settings.output_path))
    by_id = rows(manifest)
    assert ok_ids(manifest) == {
        "apple/apple_0000.JPEG", "apple/apple_0001.JPEG", "apple/apple_0002.JPEG",
        "pear/pear_0000.JPEG", "pear/pear_0001.JPEG",
    }  # fmt: skip
    assert by_id["apple/loop"][0] == by_id["pear/up"][0] == by_id["pear/apples"][0] == "skipped"
    assert by_id["pear/pear_\\xe9.JPEG"][0] == "bad" and by_id["plum\\xff"][0] == "bad"

    dataset = open_dataset(mds_root(settings.output_path))
    samples = [dataset[i] for i in range(len(dataset))]
    assert Counter(s["label_as_text"] for s in samples) == {"apple": 3, "pear": 2}
    assert Counter(s["label"] for s in samples) == {0: 3, 1: 2}
