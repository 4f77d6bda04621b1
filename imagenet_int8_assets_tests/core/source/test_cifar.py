"""CIFAR-10 reading and class-folder export on small files in the official pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.source.cifar import (
    MARKER,
    CifarError,
    export_cifar10_as_folders,
    find_cifar10_root,
    read_cifar10,
)
from imagenet_int8_assets.core.source.sources import class_labels, list_class_folders

LABEL_NAMES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
BATCH_SIZES = {"data_batch_1": 7, "data_batch_2": 7, "test_batch": 5}


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar(folder: Path, batches: dict[str, int] = BATCH_SIZES, seed: int = 0) -> dict:
    """Write batches in the official format; return {file: (data (N, 3072), labels)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        _write_pickle(
            folder / name,
            {
                b"batch_label": f"{name} of 5".encode(),
                b"labels": labels,
                b"data": data,
                b"filenames": [f"{name}_img_{i}.png".encode() for i in range(n)],
            },
        )
        written[name] = (data, labels)
    _write_pickle(
        folder / "batches.meta",
        {
            b"num_cases_per_batch": 10000,
            b"label_names": [n.encode() for n in LABEL_NAMES],
            b"num_vis": 3072,
        },
    )
    return written


def full_train_batches() -> dict[str, int]:
    return {**{f"data_batch_{i}": 7 for i in range(1, 6)}, "test_batch": 5}


@pytest.fixture
def cifar(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    written = make_cifar(folder, full_train_batches())
    return folder, written


def test_round_trip_is_exact_and_hwc(cifar):
    folder, written = cifar
    images, labels, filenames, names = read_cifar10(folder, "train")
    assert names == LABEL_NAMES
    assert images.dtype == np.uint8 and images.shape == (35, 32, 32, 3)
    assert labels.dtype == np.int64 and labels.shape == (35,)
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    expected_labels = [lab for i in range(1, 6) for lab in written[f"data_batch_{i}"][1]]
    assert labels.tolist() == expected_labels
    assert filenames[0] == "data_batch_1_img_0.png" and filenames[7] == "data_batch_2_img_0.png"
    # One pixel by hand: row y, column x of image k: R at y*32+x, G at 1024+..., B at 2048+...
    k, y, x = 9, 5, 17
    row = expected[k]
    assert images[k, y, x].tolist() == [row[y * 32 + x], row[1024 + y * 32 + x], row[2048 + y * 32 + x]]
    # And every pixel through the documented layout.
    assert np.array_equal(images, expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert np.array_equal(images.transpose(0, 3, 1, 2).reshape(-1, 3072), expected)


def test_split_counts(cifar):
    folder, written = cifar
    assert read_cifar10(folder, "train")[0].shape[0] == 35
    test_images, test_labels, _, _ = read_cifar10(folder, "test")
    assert test_images.shape[0] == 5
    assert test_labels.tolist() == written["test_batch"][1]
    all_images, all_labels, all_names, _ = read_cifar10(folder, "all")
    assert all_images.shape[0] == 40 and len(all_names) == 40
    assert np.array_equal(all_images[35:], test_images)
    with pytest.raises(ValueError, match="split"):
        read_cifar10(folder, "validation")


def test_find_root_with_and_without_subfolder(cifar, tmp_path):
    folder, _ = cifar
    assert find_cifar10_root(folder) == folder
    assert find_cifar10_root(folder.parent) == folder  # the folder containing cifar-10-batches-py
    read_cifar10(folder.parent, "test")  # reading accepts either as well
    flat = tmp_path / "flat"
    make_cifar(flat, {"test_batch": 2})
    assert find_cifar10_root(flat) == flat
    assert find_cifar10_root(tmp_path / "empty") is None
    (tmp_path / "nothing").mkdir()
    assert find_cifar10_root(tmp_path / "nothing") is None
    with pytest.raises(CifarError, match="batches.meta"):
        read_cifar10(tmp_path / "nothing")


def test_missing_batch_file_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)  # only data_batch_1, data_batch_2 and test_batch
    with pytest.raises(CifarError, match="data_batch_3") as info:
        read_cifar10(folder, "train")
    assert isinstance(info.value, ValueError)
    assert "cifar-10-batches-py" in str(info.value) and "batches.meta" in str(info.value)
    assert read_cifar10(folder, "test")[0].shape[0] == 5  # other splits still work
    with pytest.raises(CifarError, match="data_batch_3"):
        export_cifar10_as_folders(folder, tmp_path / "out", "train")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_export_class_folders_and_lossless_pngs(cifar, tmp_path):
    folder, written = cifar
    images, labels, _, _ = read_cifar10(folder, "train")
    dest = export_cifar10_as_folders(folder.parent, tmp_path / "export", "train")
    assert dest == tmp_path / "export"
    assert (dest / MARKER).read_text().strip() == "train"
    assert sorted(p.name for p in dest.iterdir() if p.is_dir()) == LABEL_NAMES
    for c, name in enumerate(LABEL_NAMES):
        assert len(list((dest / name).glob("*.png"))) == int((labels == c).sum())
    assert sum(1 for _ in dest.rglob("*.png")) == 35
    for index in range(35):
        path = dest / LABEL_NAMES[labels[index]] / f"train_{index:05d}.png"
        with Image.open(path) as img:
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            assert np.array_equal(np.asarray(img), images[index])
    # The project's folder-order label rule gives back CIFAR's indices and names.
    labels_rule = class_labels(list_class_folders(dest))
    assert labels_rule.scheme == "folder-order"
    assert labels_rule.index == {n: i for i, n in enumerate(LABEL_NAMES)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_export_is_idempotent_and_rebuilds_for_another_split(cifar, tmp_path):
    folder, _ = cifar
    dest = tmp_path / "export"
    export_cifar10_as_folders(folder, dest, "train")
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    inodes = {p: p.stat().st_ino for p in dest.rglob("*")}
    assert export_cifar10_as_folders(folder, dest, "train") == dest
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    assert {p: p.stat().st_ino for p in dest.rglob("*")} == inodes

    export_cifar10_as_folders(folder, dest, "test")
    assert (dest / MARKER).read_text().strip() == "test"
    pngs = sorted(p.name for p in dest.rglob("*.png"))
    assert len(pngs) == 5 and all(n.startswith("test_") for n in pngs)

    export_cifar10_as_folders(folder, dest, "all")
    assert sum(1 for _ in dest.rglob("train_*.png")) == 35
    assert sum(1 for _ in dest.rglob("test_*.png")) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_export_refuses_to_replace_foreign_folder(cifar, tmp_path):
    folder, _ = cifar
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    with pytest.raises(CifarError, match="refusing"):
        export_cifar10_as_folders(folder, dest, "test")
    assert (dest / "keep.txt").read_text() == "user data"


def test_export_requires_alphabetical_label_names(tmp_path):
    folder = tmp_path / "cifar"
    make_cifar(folder, {"test_batch": 3})
    _write_pickle(
        folder / "batches.meta",
        {b"label_names": [n.encode() for n in reversed(LABEL_NAMES)], b"num_cases_per_batch": 3},
    )
    with pytest.raises(CifarError, match="sorted"):
        export_cifar10_as_folders(folder, tmp_path / "out", "test")
