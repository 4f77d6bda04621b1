"""CIFAR-10 ("python version") as a source: read the official pickles, export class folders.

The official archive ``cifar-10-python.tar.gz`` unpacks to ``cifar-10-batches-py/`` holding

- ``data_batch_1`` .. ``data_batch_5`` (10,000 images each) and ``test_batch`` (10,000): pickled
  dicts with bytes keys ``b"data"`` (uint8 array of shape (N, 3072): each row is the 1024 red,
  then 1024 green, then 1024 blue values of a 32x32 image, row-major), ``b"labels"`` (N ints),
  ``b"filenames"`` (N bytes) and ``b"batch_label"``;
- ``batches.meta``: a pickled dict with ``b"label_names"`` (10 bytes), ``b"num_cases_per_batch"``
  and ``b"num_vis"``.

Security: unpickling runs whatever the pickle says, so a pickle from an untrusted source can
execute code. These readers do nothing but ``pickle.load(f, encoding="bytes")`` on the official
dataset files the user points at; only point them at the real CIFAR-10 download.

Labels: CIFAR-10's label order (airplane=0, automobile=1, bird=2, cat=3, deer=4, dog=5, frog=6,
horse=7, ship=8, truck=9) is alphabetical, so the project's folder-order label rule (sorted class
folder names, see ``sources.class_labels``) applied to the exported class folders gives exactly
CIFAR's label indices and names. The export asserts this (``label_names == sorted(label_names)``).
Label names that are not plain folder names (``../x``, absolute paths) get safe folder names and a
label record that keeps their index and text (``class_folder_names``).
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
from PIL import Image

from imagenet_int8_assets.core.source.sources import SourceError, class_name_problem, write_labels_record
from imagenet_int8_assets.core.common.files import atomic_dir

SUBFOLDER = "cifar-10-batches-py"
META_FILE = "batches.meta"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
SPLITS = ("train", "test", "all")
MARKER = ".cifar10-complete"
IMAGE_SIZE = 32

_LAYOUT = (
    "A CIFAR-10 source must be the unpacked 'python version' (cifar-10-python.tar.gz): a folder "
    f"named {SUBFOLDER}/ (or a folder containing it) with {', '.join(TRAIN_FILES)}, "
    f"{TEST_FILES[0]} and {META_FILE}."
)


class CifarError(SourceError):
    """The CIFAR-10 folder cannot be used; the message names the problem and the expected layout."""


def find_cifar10_root(path: str | os.PathLike) -> Path | None:
    """The folder holding ``batches.meta`` and the batch files: ``path`` itself or
    ``path/cifar-10-batches-py``; None if neither holds ``batches.meta``."""
    path = Path(path).expanduser()
    for candidate in (path, path / SUBFOLDER):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def _resolve_root(root: str | os.PathLike) -> Path:
    found = find_cifar10_root(root)
    if found is None:
        raise CifarError(
            f"No {META_FILE} in {str(Path(root))!r} or in {str(Path(root) / SUBFOLDER)!r}. {_LAYOUT}"
        )
    return found


def _load_pickle(path: Path) -> dict:
    if not path.is_file():
        raise CifarError(f"Missing CIFAR-10 file {str(path)!r}. {_LAYOUT}")
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as exc:  # corrupt/truncated pickles raise many different types
        raise CifarError(f"Cannot read CIFAR-10 file {str(path)!r}: {exc!r}. {_LAYOUT}") from exc
    if not isinstance(obj, dict):
        raise CifarError(
            f"CIFAR-10 file {str(path)!r} holds a {type(obj).__name__}, not a dict. {_LAYOUT}"
        )
    return obj


def _text(value: bytes | str) -> str:
    """Text of a name from a pickle; bytes that are not UTF-8 are kept as ``\\xNN``."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _is_plain_folder_name(name: str) -> bool:
    """True when a label name can be a class folder name as it is: one path component that is
    not hidden, not "." or "..", short, and a valid class name (``class_name_problem``)."""
    return (
        bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= 128
        and class_name_problem(name) is None
    )


def class_folder_names(label_names: list[str]) -> list[str]:
    """A safe, distinct class folder name for each label name, in label order.

    Label names come from a data file, so they never become paths unchecked. A plain name
    ("airplane") is its own folder name; any other (``../../x``, an absolute path, ".", a name
    with control characters) becomes ``label_<index>_<letters and digits of the name>``, with
    ``_`` appended until it differs from every other folder name. Deterministic: the same label
    names always give the same folders.
    """
    plain = [name if _is_plain_folder_name(name) else None for name in label_names]
    taken = {name for name in plain if name is not None}
    folders = []
    for index, (name, kept) in enumerate(zip(label_names, plain)):
        if kept is None:
            letters = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:40]
            kept = f"label_{index}_{letters}" if letters else f"label_{index}"
            while kept in taken:
                kept += "_"
            taken.add(kept)
        folders.append(kept)
    return folders


def _read_label_names(root: Path) -> list[str]:
    meta = _load_pickle(root / META_FILE)
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names:
        raise CifarError(f"{str(root / META_FILE)!r} has no b'label_names' list. {_LAYOUT}")
    return [_text(n) for n in names]


def _read_batch(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, 32, 32, 3), labels int64 (N,), filenames) of one batch file."""
    batch = _load_pickle(path)
    missing = [k for k in (b"data", b"labels") if k not in batch]
    if missing:
        raise CifarError(f"{str(path)!r} lacks key(s) {missing}. {_LAYOUT}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * IMAGE_SIZE * IMAGE_SIZE:
        raise CifarError(
            f"{str(path)!r}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072). {_LAYOUT}"
        )
    n = data.shape[0]
    labels = np.asarray(batch[b"labels"], dtype=np.int64).reshape(-1)
    if labels.shape != (n,):
        raise CifarError(f"{str(path)!r}: {labels.shape[0]} labels for {n} images. {_LAYOUT}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise CifarError(
            f"{str(path)!r}: labels outside 0..{num_classes - 1} (the {META_FILE} label names)."
        )
    raw_names = batch.get(b"filenames")
    if raw_names is None:
        filenames = [f"{path.name}_{i:05d}.png" for i in range(n)]
    else:
        filenames = [_text(f) for f in raw_names]
        if len(filenames) != n:
            raise CifarError(f"{str(path)!r}: {len(filenames)} filenames for {n} images. {_LAYOUT}")
    # Row = R plane, G plane, B plane, each 32x32 row-major -> (N, 3, 32, 32) -> HWC.
    images = data.reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels, filenames


def _split_files(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    return {"train": TRAIN_FILES, "test": TEST_FILES, "all": TRAIN_FILES + TEST_FILES}[split]


def _read_files(root: Path, files: tuple[str, ...], num_classes: int):
    # Check every file exists before loading any, so a missing one fails fast.
    for name in files:
        if not (root / name).is_file():
            raise CifarError(f"Missing CIFAR-10 file {str(root / name)!r}. {_LAYOUT}")
    parts = [_read_batch(root / name, num_classes) for name in files]
    images = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, 32, 32, 3), np.uint8)
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0,), np.int64)
    filenames = [f for p in parts for f in p[2]]
    return images, labels, filenames


def read_cifar10(
    root: str | os.PathLike, split: str = "train"
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Load a CIFAR-10 split.

    ``root`` is the ``cifar-10-batches-py`` folder or a folder containing it. ``split`` is
    ``"train"`` (data_batch_1..5 in order), ``"test"`` (test_batch) or ``"all"`` (train, then
    test). Returns ``(images, labels, filenames, label_names)``: images uint8 (N, 32, 32, 3) in
    RGB/HWC order, labels int64 (N,), the original file names, and the 10 class names.
    Raises ``CifarError`` (a ``ValueError``) naming any missing or malformed file.
    """
    files = _split_files(split)
    base = _resolve_root(root)
    label_names = _read_label_names(base)
    images, labels, filenames = _read_files(base, files, len(label_names))
    return images, labels, filenames, label_names


def _marker_split(dest: Path) -> str | None:
    try:
        return (dest / MARKER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def export_cifar10_as_folders(
    root: str | os.PathLike, dest: str | os.PathLike, split: str = "train"
) -> Path:
    """Write a CIFAR-10 split as class folders of lossless PNGs at ``dest``; returns ``dest``.

    Layout: ``dest/<label name>/<origin split>_<index:05d>.png`` with one folder per CIFAR class
    (airplane, automobile, ...). ``index`` is the image's position within its origin split in
    batch-file order (train: data_batch_1..5 -> 0..49999; test: test_batch -> 0..9999), so names
    are stable and the same image has the same name whether ``split`` is "train", "test" or
    "all" ("all" writes ``train_*`` and ``test_*`` files).

    Idempotent and atomic like the sample generator: written into a hidden sibling
    ``.tmp-<name>-<random>``, a ``.cifar10-complete`` marker holding the split is added, and the
    folder is renamed into place. If ``dest`` already carries the marker for this split it is
    returned untouched; with a marker for another split it is rebuilt. An existing, non-empty
    ``dest`` without the marker is refused rather than deleted (it may be the user's data).

    Labels: CIFAR's label names are alphabetical (checked here), so sorted class folders give
    exactly CIFAR's label indices through the folder-order label rule. Label names come from a
    data file: a name that is not a plain folder name gets a safe folder name
    (``class_folder_names``), and the export then records every folder's label index and
    original name in ``sources.LABELS_RECORD``, which ``sources.class_labels`` reads, so the
    label text stays the original name. Nothing is ever written outside ``dest``.
    """
    _split_files(split)  # validates the split name
    dest = Path(dest).expanduser()
    if _marker_split(dest) == split:
        return dest
    if dest.exists() and not (dest / MARKER).is_file():
        if not dest.is_dir() or any(dest.iterdir()):
            raise CifarError(
                f"Export destination {str(dest)!r} exists and is not a CIFAR-10 export (no "
                f"{MARKER}); refusing to replace it. Choose an empty or new folder."
            )
    base = _resolve_root(root)
    label_names = _read_label_names(base)
    if label_names != sorted(label_names) or len(set(label_names)) != len(label_names):
        raise CifarError(
            f"{str(base / META_FILE)!r} label names {label_names} are not unique and in sorted "
            "order, so class folders sorted by name would not keep CIFAR's label indices."
        )
    groups = []
    if split in ("train", "all"):
        groups.append(("train", TRAIN_FILES))
    if split in ("test", "all"):
        groups.append(("test", TEST_FILES))
    loaded = [(origin, _read_files(base, names, len(label_names))) for origin, names in groups]

    folders = class_folder_names(label_names)
    # Written aside and swapped in whole: a failure leaves the previous export (or nothing). Two
    # exports to one folder may run at once, so neither deletes the other's temporary folder.
    with atomic_dir(dest, clean_leftovers=False) as tmp:
        for folder in folders:
            (tmp / folder).mkdir()
        for origin, (images, labels, _) in loaded:
            for index, (image, label) in enumerate(zip(images, labels)):
                path = tmp / folders[label] / f"{origin}_{index:05d}.png"
                Image.fromarray(image, "RGB").save(path, format="PNG")
        if folders != label_names:
            write_labels_record(tmp, [(f, i, name) for i, (f, name) in enumerate(zip(folders, label_names))])
        (tmp / MARKER).write_text(f"{split}\n", encoding="utf-8")
    return dest
