"""Source datasets: finding class folders, assigning labels, and probing every file.

A source is either a folder of class subfolders or an ImageNet root that contains ``train/``.
Every file under a class folder becomes one manifest row with a status:

- ``ok``: a decodable image that the crop step will process;
- ``bad``: meant to be an image (or claims to be one) but cannot be used, with the reason;
- ``skipped``: not an image at all (hidden/system files, non-image files), with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import UnidentifiedImageError

from imagenet_int8_assets.core.images import DEFAULT_MAX_PIXELS, ImageRejected, open_image
from imagenet_int8_assets.core.parallel import map_ordered

# Extensions we expect to be images; a file with another extension that PIL cannot identify is
# "skipped" (not an image), one with an image extension that PIL cannot read is "bad".
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .bmp .gif .tif .tiff .webp .ppm .pgm .pbm .pnm .tga .ico".split()
)
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
MANIFEST_COLUMNS = [
    "id",
    "class_folder",
    "label",
    "label_text",
    "width",
    "height",
    "mode",
    "format",
    "bytes",
    "status",
    "reason",
]


class SourceError(ValueError):
    """The configured source cannot be used; the message says why and what to do."""


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str, str], ...]:
    """The 1000 ILSVRC-2012 classes as (wnid, short name, published label text), in index order.

    The published Imagenet.int8 ``label_as_text`` is the long WordNet name ("tench, Tinca
    tinca"); the short name ("tench") is kept for display.
    """
    table = Path(__file__).with_name("imagenet_classes.tsv")
    return tuple(
        tuple(line.split("\t"))  # type: ignore[misc]
        for line in table.read_text(encoding="utf-8").splitlines()
    )


def resolve_source_root(source: str | os.PathLike) -> Path:
    """The folder that holds the class folders: ``source/train`` if it exists, else ``source``."""
    root = Path(source).expanduser()
    if not root.is_dir():
        raise SourceError(
            f"Source folder {str(root)!r} does not exist or is not a folder. Set "
            "IMAGENET_INT8_SOURCE to a folder of class subfolders (one folder per class, images "
            "inside) or to an ImageNet root that contains train/."
        )
    train = root / "train"
    return train if train.is_dir() else root


def list_class_folders(source: str | os.PathLike) -> list[str]:
    """Class folder names under the source, sorted; hidden folders are ignored."""
    root = resolve_source_root(source)
    folders = sorted(
        entry.name
        for entry in os.scandir(root)
        if entry.is_dir(follow_symlinks=True) and not entry.name.startswith(".")
    )
    if not folders:
        raise SourceError(
            f"No class folders found in {str(root)!r}. The source must contain one subfolder per "
            "class (for ImageNet: train/n01440764/..., or n01440764/... directly)."
        )
    return folders


@dataclass(frozen=True)
class ClassLabels:
    """Label index and text for every class folder, and which rule produced them."""

    scheme: str  # "imagenet" or "folder-order"
    index: dict[str, int]
    text: dict[str, str]
    note: str


def class_labels(class_folders: list[str]) -> ClassLabels:
    """Labels for the class folders.

    If every folder is an ImageNet wnid, each gets its ILSVRC-2012 index and class name, so a
    subset build is label-compatible with the full dataset. Otherwise every folder gets its
    index in sorted order and its own name as text (mixing the two rules would make two classes
    share an index).
    """
    table = {row[0]: (i, row[-1]) for i, row in enumerate(imagenet_classes())}
    folders = sorted(class_folders)
    if folders and all(f in table for f in folders):
        return ClassLabels(
            scheme="imagenet",
            index={f: table[f][0] for f in folders},
            text={f: table[f][1] for f in folders},
            note="all class folders are ILSVRC-2012 wnids: labels follow the ImageNet index",
        )
    wnid_like = [f for f in folders if f in table]
    note = "class folders are not all ILSVRC-2012 wnids: labels follow sorted folder order"
    if wnid_like:
        note += (
            f" ({len(wnid_like)} of {len(folders)} folders are wnids; a mixed source cannot keep "
            "ImageNet indices without collisions)"
        )
    return ClassLabels(
        scheme="folder-order",
        index={f: i for i, f in enumerate(folders)},
        text={f: f for f in folders},
        note=note,
    )


def probe_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Header facts and a status for one file. Never raises for bad content.

    Images are fully decoded once (JPEG at 1/8 scale through PIL's draft mode, which still reads
    the whole entropy-coded stream) so truncated and corrupt files are found here, before any
    partition runs.
    """
    path = Path(path)
    row = {"width": 0, "height": 0, "mode": "", "format": "", "bytes": 0}
    name = path.name
    suffix = path.suffix.lower()
    try:
        row["bytes"] = path.stat().st_size
    except OSError as exc:
        return {**row, "status": "bad", "reason": f"cannot read file: {exc.strerror or exc}"}
    if name.startswith(".") or name.lower() in SYSTEM_FILES:
        return {**row, "status": "skipped", "reason": "hidden or system file"}
    if row["bytes"] == 0:
        return {**row, "status": "bad", "reason": "empty file (0 bytes)"}
    try:
        with open_image(path, max_pixels) as img:
            width, height = img.size
            row.update(width=width, height=height, mode=img.mode, format=img.format or "")
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
    except ImageRejected as exc:
        return {**row, "status": "bad", "reason": str(exc)}
    except UnidentifiedImageError:
        if suffix in IMAGE_EXTENSIONS:
            return {**row, "status": "bad", "reason": "not a readable image (unknown format)"}
        return {**row, "status": "skipped", "reason": f"not an image file ({suffix or 'no extension'})"}
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        return {**row, "status": "bad", "reason": f"cannot decode: {exc}"}
    return {**row, "status": "ok", "reason": ""}


def _probe_task(task: tuple[str, int]) -> dict:
    path, max_pixels = task
    return probe_image(path, max_pixels)


def list_files(source: str | os.PathLike) -> list[tuple[str, str]]:
    """(class folder, path relative to the class root) for every file, in sorted order."""
    root = resolve_source_root(source)
    out = []
    for folder in list_class_folders(source):
        base = root / folder
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                rel = (Path(dirpath) / filename).relative_to(root).as_posix()
                out.append((folder, rel))
    return out


def scan_source(
    source: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, ClassLabels]:
    """The raw manifest: one row per file under the source (columns ``MANIFEST_COLUMNS``).

    ``id`` is the path relative to the class root (``n01440764/n01440764_10026.JPEG``): unique,
    stable across machines, and the key that seeds per-image sampling.
    """
    root = resolve_source_root(source)
    folders = list_class_folders(source)
    labels = class_labels(folders)
    files = list_files(source)
    tasks = [(str(root / rel), max_pixels) for _, rel in files]
    probes = []
    for probe in map_ordered(_probe_task, tasks, workers, chunksize=64):
        probes.append(probe)
        if progress is not None:
            progress(len(probes), len(tasks))
    rows = [
        {
            "id": rel,
            "class_folder": folder,
            "label": labels.index[folder],
            "label_text": labels.text[folder],
            **probe,
        }
        for (folder, rel), probe in zip(files, probes)
    ]
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = frame.astype(
        {"label": "int64", "width": "int64", "height": "int64", "bytes": "int64"}
    )
    return frame, labels
