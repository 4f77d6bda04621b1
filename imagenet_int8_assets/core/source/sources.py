"""Source datasets: finding class folders, assigning labels, and probing every file.

A source is either a folder of class subfolders or an ImageNet root that contains ``train/``.
Every file under a class folder becomes one manifest row with a status:

- ``ok``: a decodable image that the crop step will process;
- ``bad``: meant to be an image (or claims to be one) but cannot be used, with the reason;
- ``skipped``: not an image at all (hidden/system files, non-image files), or not read because
  reading it would read files twice (a directory link loop, a link to another class's folder, a
  second path to a file already read), with the reason.

Every file is read at most once per source, whatever links it holds (``walk_source``), and names
that are not valid UTF-8 or cannot be partition keys are recorded, never fatal
(``find_class_folders``, ``class_name_problem``).
"""

from __future__ import annotations

import errno
import json
import os
import stat
import unicodedata
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd
from PIL import UnidentifiedImageError

from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS, ImageRejected, open_image
from imagenet_int8_assets.core.common.parallel import map_ordered

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
    "mtime_ns",
    "status",
    "reason",
    "ctime_ns",
    "inode",
    "change",
]
# What a probe records from the file's one ``stat``: size and modification time (compared by every
# rescan), and the inode's change time and number, which nothing but the file system sets: a rewrite
# that puts the size and modification time back (``touch -r``, a restore from backup, some sync
# tools) still gets a new ctime, a replacement by rename a new inode (``scan_source``).
STAT_FIELDS = ("bytes", "mtime_ns", "ctime_ns", "inode")
PROBE_FIELDS = ("width", "height", "mode", "format", *STAT_FIELDS, "status", "reason")
KEPT_FIELDS = tuple(f for f in PROBE_FIELDS if f not in STAT_FIELDS)  # a reused row's, beside a new stat


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


def display_name(name: str) -> str:
    """A file name as text that can always be stored and printed: bytes that are not valid UTF-8
    (which Python hands over as surrogate escapes) are shown as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def is_undecodable(name: str) -> bool:
    """True when a name from the file system is not valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# Dagster 1.13.27 refuses these substrings in partition keys (INVALID_PARTITION_SUBSTRINGS:
# "..." and the control characters \a \b \f \n \r \t \v \0); we refuse every control character.
PARTITION_KEY_RESERVED = ("...",)


def class_name_problem(name: str) -> str | None:
    """Why a folder name cannot be a class (a Dagster partition key), or None if it can."""
    if is_undecodable(name):
        return (
            f"class folder name '{display_name(name)}' is not valid UTF-8 (bytes shown escaped); "
            "rename the folder to include its images"
        )
    controls = sorted({f"U+{ord(ch):04X}" for ch in name if unicodedata.category(ch) == "Cc"})
    if controls:
        return (
            f"class folder name {name!r} contains control character(s) {', '.join(controls)}, which "
            "cannot be a Dagster partition key; rename the folder to include its images"
        )
    for reserved in PARTITION_KEY_RESERVED:
        if reserved in name:
            return (
                f"class folder name {name!r} contains {reserved!r}, which Dagster reserves for "
                "partition ranges; rename the folder to include its images"
            )
    return None


def _identity(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


def _link_text(path: str | os.PathLike) -> str:
    try:
        return display_name(os.readlink(path))
    except OSError:
        return "?"


def _is_inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def _not_a_class(entry_id: str, status: str, reason: str) -> dict:
    """The manifest row of a top-level entry that is not a class: class_folder "" (label -1)."""
    return {"id": entry_id, "class_folder": "", "status": status, "reason": reason}


@dataclass(frozen=True)
class ClassFolders:
    """The class folders of a source: ``names`` (sorted; the partition keys) and ``rejected``
    (manifest rows, class_folder "", for top-level folders and links that are not classes)."""

    root: Path
    names: list[str]
    rejected: list[dict]


def find_class_folders(source: str | os.PathLike) -> ClassFolders:
    """The usable class folders under the source and a row for each folder that is not one.

    Cheap (one directory listing and one stat per entry), so it runs whenever the definitions
    load. Hidden folders and plain files at the top level are ignored. A folder is not a class
    when its name is not valid UTF-8 or cannot be a partition key (``bad``), or when it is a link
    that is broken, loops, leads to the source folder or above, to the same folder as another
    class, or into another class's folder (``skipped``: reading it would read images twice).
    Real folders win over links to them; among links, the one to the shortest path, then the
    first name in sorted order.
    """
    root = resolve_source_root(source)
    above = set()  # identities of the source folder and every folder above it
    for folder in (root.resolve(), *root.resolve().parents):
        with suppress(OSError):
            above.add(_identity(os.stat(folder)))
    rejected: list[dict] = []
    real: list[tuple[str, tuple[int, int], str]] = []
    links: list[tuple[str, tuple[int, int], str]] = []
    with os.scandir(root) as entries:
        listing = sorted(entries, key=lambda e: e.name)
    for entry in listing:
        name = entry.name
        if name.startswith("."):
            continue
        shown = display_name(name)
        is_link = entry.is_symlink()
        try:
            st = os.stat(entry.path)
        except OSError as exc:
            if is_link:
                kind = "loops" if exc.errno == errno.ELOOP else "is broken"
                rejected.append(
                    _not_a_class(
                        shown,
                        "skipped",
                        f"class folder link {shown} -> {_link_text(entry.path)} {kind} "
                        f"({exc.strerror}): not a class; fix or remove the link",
                    )
                )
            else:
                rejected.append(
                    _not_a_class(shown, "bad", f"cannot read class folder {shown}: {exc.strerror or exc}")
                )
            continue
        if not stat.S_ISDIR(st.st_mode):
            continue
        problem = class_name_problem(name)
        if problem:
            rejected.append(_not_a_class(shown, "bad", problem))
            continue
        target = os.path.realpath(entry.path)
        if is_link and _identity(st) in above:
            rejected.append(
                _not_a_class(
                    name,
                    "skipped",
                    f"class folder link {name} -> {_link_text(entry.path)} leads to the source folder "
                    "or a folder above it: not a class (it would read every class again)",
                )
            )
            continue
        (links if is_link else real).append((name, _identity(st), target))
    accepted: dict[tuple[int, int], str] = {}
    targets: dict[str, str] = {}  # an accepted class's folder -> the class
    links.sort(key=lambda item: (len(Path(item[2]).parts), item[0]))
    for name, ident, target in real + links:
        owner = accepted.get(ident)
        if owner is None:
            # an accepted class's folder above the target (accepted folders never nest: real ones are
            # siblings, and links come shortest first): a lookup per level, not a comparison with
            # every class (that was quadratic: seconds at 1,000 classes)
            owner = next((targets[str(up)] for up in Path(target).parents if str(up) in targets), None)
            where = f"points inside class {owner}'s folder"
        else:
            where = f"is the same folder as class {owner}"
        if owner is not None:
            rejected.append(
                _not_a_class(
                    name,
                    "skipped",
                    f"class folder link {name} -> {_link_text(root / name)} {where}: not a class "
                    f"(its images are read once, as class {owner}); remove the link",
                )
            )
            continue
        accepted[ident] = name
        targets[target] = name
    rejected.sort(key=lambda row: row["id"])
    return ClassFolders(root=root, names=sorted(targets.values()), rejected=rejected)


def list_class_folders(source: str | os.PathLike) -> list[str]:
    """Class folder names under the source, sorted (see ``find_class_folders``)."""
    return _require_classes(find_class_folders(source))


def _require_classes(found: ClassFolders) -> list[str]:
    if not found.names:
        why = "".join(f" {row['id']}: {row['reason']}." for row in found.rejected[:5])
        raise SourceError(
            f"No class folders found in {str(found.root)!r}. The source must contain one subfolder per "
            "class (for ImageNet: train/n01440764/..., or n01440764/... directly)." + why
        )
    return found.names


@dataclass(frozen=True)
class ClassLabels:
    """Label index and text for every class folder, and which rule produced them."""

    scheme: str  # "imagenet", "folder-order" or "recorded" (a label record, see LABELS_RECORD)
    index: dict[str, int]
    text: dict[str, str]
    note: str


# A label record written by a source export (the CIFAR-10 export): the label index and text of
# each class folder, for sources whose label names cannot be folder names as they are.
LABELS_RECORD = ".class-labels.json"


def write_labels_record(folder: str | os.PathLike, labels: list[tuple[str, int, str]]) -> Path:
    """Write ``folder/.class-labels.json`` for (class folder, label index, label text) triples."""
    path = Path(folder) / LABELS_RECORD
    rows = [{"folder": f, "label": int(i), "text": t} for f, i, t in labels]
    path.write_text(json.dumps({"classes": rows}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path


def _recorded_labels(source: str | os.PathLike, folders: list[str]) -> ClassLabels | str | None:
    """The labels in the source's label record; a note when the record cannot be used; None
    when there is none."""
    path = resolve_source_root(source) / LABELS_RECORD
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["classes"]
        index = {str(r["folder"]): int(r["label"]) for r in rows}
        text = {str(r["folder"]): str(r["text"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"label record {str(path)!r} is unreadable ({exc}) and was ignored"
    if sorted(index) != folders or len(set(index.values())) != len(index):
        return (
            f"label record {str(path)!r} does not list exactly the class folders with distinct "
            "labels and was ignored"
        )
    return ClassLabels(
        scheme="recorded",
        index=index,
        text=text,
        note=f"labels and label texts from {str(path)!r} (written by the source export)",
    )


def class_labels(class_folders: list[str], source: str | os.PathLike | None = None) -> ClassLabels:
    """Labels for the class folders.

    When ``source`` is given and holds a label record (``LABELS_RECORD``, written by the CIFAR-10
    export), its labels and texts are used. Otherwise, if every folder is an ImageNet wnid, each
    gets its ILSVRC-2012 index and class name, so a subset build is label-compatible with the full
    dataset; else every folder gets its index in sorted order and its own name as text (mixing the
    two rules would make two classes share an index).
    """
    table = {row[0]: (i, row[-1]) for i, row in enumerate(imagenet_classes())}
    folders = sorted(class_folders)
    recorded = _recorded_labels(source, folders) if source is not None else None
    if isinstance(recorded, ClassLabels):
        return recorded
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
    if recorded:
        note += f"; {recorded}"
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
    row = {"width": 0, "height": 0, "mode": "", "format": "", **dict.fromkeys(STAT_FIELDS, 0)}
    name = path.name
    suffix = path.suffix.lower()
    try:
        st = path.stat()  # before the file is read: a change while it is read shows at the next scan
        row.update(zip(STAT_FIELDS, _stat_fields(st)))
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


def _stat_fields(st: os.stat_result) -> tuple[int, int, int, int]:
    """(bytes, mtime_ns, ctime_ns, inode) of one ``stat`` result: the ``STAT_FIELDS`` of a row."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def change_stamp(ctime_ns: int, inode: int) -> str:
    """The ``change`` of a file rewritten in place: its size and modification time are those of its
    previous row, its ctime or inode are not. Part of its class's data version (``class_data_versions``)
    for as long as the file stays as it is, so the class is rebuilt once."""
    return f"{ctime_ns}:{inode}"


def _known_int(value) -> int:
    """A recorded ctime or inode; 0 (unknown) where the manifest predates them (a missing column, or
    a missing value in a row)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _probe_task(task: tuple[str, int]) -> dict:
    path, max_pixels = task
    return probe_image(path, max_pixels)


@dataclass(slots=True)
class _Found:
    """One entry met while walking a class: a file to probe (status "") or a row decided here."""

    folder: str
    rel: str
    seq: int
    status: str = ""
    reason: str = ""
    identity: tuple[int, int] | None = None
    rank: tuple[int, int] = (0, 0)  # (reached through a directory link, is a file link)


def walk_source(source: str | os.PathLike, classes: ClassFolders | None = None) -> list[dict]:
    """Every entry under the class folders, each file at most once: rows with ``class_folder``,
    ``id`` and, for entries that are not to be probed, ``status`` and ``reason`` (else "").

    Files are deduplicated by their real identity (device, inode) across the whole source. The
    real folders are walked first without following directory links; links are followed
    afterwards, breadth first, and only to folders not scanned yet, so a file reached without a
    directory link (and a plain file before a link to a file) keeps its own path, and link loops,
    links to a class's folder or to the source (or above) are recorded as ``skipped`` instead of
    multiplying samples. Names that are not valid UTF-8 are recorded as ``bad`` with their bytes
    escaped. Rows come class by class, each class in walk order (files, then sub-folders, sorted);
    rows of top-level entries that are not classes come last.
    """
    classes = classes if classes is not None else find_class_folders(source)
    root = classes.root
    visited: dict[tuple[int, int], str] = {}
    for folder in root.resolve().parents:
        with suppress(OSError):
            visited[_identity(os.stat(folder))] = "a folder above the source"
    visited[_identity(os.stat(root))] = "the source folder"
    for name in classes.names:
        visited[_identity(os.stat(root / name))] = f"class {name}'s folder"
    found: list[_Found] = []
    pending_links: deque[tuple[str, str, Path]] = deque()

    def add(folder: str, rel: str, **fields) -> None:
        found.append(_Found(folder, rel, len(found), **fields))

    def walk(folder: str, start: Path, start_rel: str, via_link: bool) -> None:
        stack = [(start, start_rel)]
        while stack:
            path, rel = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                add(folder, rel, status="bad", reason=f"cannot list folder {rel}: {exc.strerror or exc}")
                continue
            subfolders = []
            for entry in entries:
                entry_rel = f"{rel}/{entry.name}"
                shown = display_name(entry_rel)
                try:
                    is_dir = entry.is_dir()  # follows links; False for broken ones
                    is_link = entry.is_symlink()
                except OSError:
                    is_dir, is_link = False, True
                if is_undecodable(entry.name):
                    what = "folder" if is_dir else "file"
                    add(
                        folder,
                        shown,
                        status="bad",
                        reason=f"{what} name is not valid UTF-8 (bytes shown escaped)"
                        + ("; its files were not read" if is_dir else "")
                        + f": rename the {what} to include it",
                    )
                elif is_dir:
                    if entry.name.startswith("."):
                        continue  # hidden folders are not part of the dataset
                    if is_link:
                        pending_links.append((folder, entry_rel, Path(entry.path)))
                    else:
                        subfolders.append((entry, entry_rel))
                elif is_link:
                    try:
                        st = os.stat(entry.path)
                    except OSError as exc:
                        kind = "link loop" if exc.errno == errno.ELOOP else "broken link"
                        add(
                            folder,
                            entry_rel,
                            status="skipped" if exc.errno == errno.ELOOP else "bad",
                            reason=f"{kind}: {entry_rel} -> {_link_text(entry.path)} ({exc.strerror}); "
                            "fix or remove the link",
                        )
                        continue
                    add(folder, entry_rel, identity=_identity(st), rank=(int(via_link), 1))
                else:
                    try:
                        ident = _identity(entry.stat(follow_symlinks=False))
                    except OSError:
                        ident = None  # the probe reports why it cannot be read
                    add(folder, entry_rel, identity=ident, rank=(int(via_link), 0))
            for entry, entry_rel in reversed(subfolders):
                try:
                    ident = _identity(entry.stat(follow_symlinks=False))
                except OSError:
                    ident = None  # listing it reports why it cannot be read
                if ident in visited:  # a bind mount or the like: the same folder twice
                    add(folder, entry_rel, status="skipped", reason=f"folder {entry_rel} is {visited[ident]}, already scanned")
                    continue
                if ident is not None:
                    visited[ident] = f"the folder {entry_rel}"
                stack.append((Path(entry.path), entry_rel))

    for name in classes.names:
        walk(name, root / name, name, via_link=False)
    while pending_links:
        folder, rel, path = pending_links.popleft()
        target = _link_text(path)
        try:
            ident = _identity(os.stat(path))
        except OSError as exc:
            add(folder, rel, status="skipped", reason=f"directory link {rel} -> {target} cannot be followed ({exc.strerror})")
            continue
        if ident in visited:
            here, there = os.path.realpath(path.parent), os.path.realpath(path)
            if here == there or _is_inside(here, there):
                why = f"directory link loop: {rel} -> {target} leads back to {visited[ident]}, which contains it"
            else:
                why = f"directory link {rel} -> {target} leads to {visited[ident]}, which is read there"
            add(folder, rel, status="skipped", reason=f"{why}; not followed")
            continue
        visited[ident] = f"the folder {rel}"
        walk(folder, path, rel, via_link=True)

    owners: dict[tuple[int, int], str] = {}
    for item in sorted((f for f in found if f.identity is not None), key=lambda f: (f.rank, f.seq)):
        first = owners.setdefault(item.identity, item.rel)
        if first != item.rel:
            item.status, item.reason = "skipped", f"same file as {first} (read once, under that id)"
    order = {name: i for i, name in enumerate(classes.names)}
    found.sort(key=lambda f: (order[f.folder], f.seq))
    rows = [{"class_folder": f.folder, "id": f.rel, "status": f.status, "reason": f.reason} for f in found]
    return rows + classes.rejected


def scan_source(
    source: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    previous: pd.DataFrame | None = None,
    extra_classes: list[str] = (),
) -> tuple[pd.DataFrame, ClassLabels]:
    """The raw manifest: one row per file under the source (columns ``MANIFEST_COLUMNS``).

    ``id`` is the path relative to the class root (``n01440764/n01440764_10026.JPEG``): unique,
    stable across machines, and the key that seeds per-image sampling. Each file is probed once
    (see ``walk_source``); rows of top-level entries that are not classes (``find_class_folders``)
    have ``class_folder`` "" and ``label`` -1, so they belong to no partition.

    ``previous``: an earlier manifest of the same source made with the same ``max_pixels``. A file
    whose id, size, modification time (ns), ctime (ns) and inode match its row there is not decoded
    again; its row is reused (a rescan of an unchanged source only stats its files). A file whose size
    and modification time match but whose ctime or inode do not was rewritten in place (or replaced by
    a rename) with its times put back: it is decoded again and its row gets a ``change`` stamp
    (``change_stamp``), which changes its class's data version; a metadata-only change (chmod, chown,
    a new hard link) looks the same and rebuilds the class too. Rows of a manifest written before
    ctime and inode were recorded are a baseline: reused on size and modification time as before,
    with the ctime and inode recorded now and no stamp. A reused row keeps its stamp, so the data
    version stays as it is while the file does. ``extra_classes``: classes that keep their label
    although their folder is gone (registered partitions; see ``class_labels``).
    """
    classes = find_class_folders(source)
    _require_classes(classes)
    labels = class_labels(sorted(set(classes.names) | set(extra_classes)), source)
    entries = walk_source(source, classes)
    todo = [i for i, entry in enumerate(entries) if not entry["status"]]
    # the previous rows by id, read column by column (a dict per row took 7-9 s at ImageNet size)
    known: dict[str, int] = {}
    old: dict[str, list | None] = {}
    if previous is not None and len(previous) and "mtime_ns" in previous.columns:
        keep = previous[previous["mtime_ns"] > 0]
        known = dict(zip(keep["id"].tolist(), range(len(keep))))
        old = {c: keep[c].tolist() if c in keep.columns else None for c in (*PROBE_FIELDS, "change")}
    root = str(classes.root)
    paths = {i: os.path.join(root, entries[i]["id"]) for i in todo}  # pathlib: 7-11 s at ImageNet size, this 1.4 s
    probes: dict[int, dict] = {}
    fresh, rewritten = [], set()
    for i in todo:
        k = known.get(entries[i]["id"])
        if k is not None:
            try:
                st = os.stat(paths[i])
            except OSError:
                st = None
            if st is not None and st.st_size == old["bytes"][k] and st.st_mtime_ns == old["mtime_ns"][k]:
                was = (0, 0)  # a manifest that predates ctime and inode: a baseline
                if old["ctime_ns"] is not None and old["inode"] is not None:
                    was = (_known_int(old["ctime_ns"][k]), _known_int(old["inode"][k]))
                if was[0] and was != (st.st_ctime_ns, st.st_ino):
                    rewritten.add(i)
                else:  # unchanged, or a baseline row (no ctime recorded): its ctime and inode from now on
                    stamp = old["change"][k] if old["change"] is not None else ""
                    probes[i] = {f: old[f][k] for f in KEPT_FIELDS}
                    probes[i].update(zip(STAT_FIELDS, _stat_fields(st)), change=stamp if isinstance(stamp, str) else "")
                    continue
        fresh.append(i)
    tasks = [(paths[i], max_pixels) for i in fresh]
    reused = len(probes)
    for i, probe in zip(fresh, map_ordered(_probe_task, tasks, workers, chunksize=64)):
        # the stamp is made of what the probe's own stat saw: what the next scan compares with
        probes[i] = {**probe, "change": change_stamp(probe["ctime_ns"], probe["inode"]) if i in rewritten else ""}
        if progress is not None:
            progress(len(probes) - reused, len(tasks))
    empty = {"width": 0, "height": 0, "mode": "", "format": "", **dict.fromkeys(STAT_FIELDS, 0), "change": ""}
    rows = [
        {
            "id": entry["id"],
            "class_folder": entry["class_folder"],
            "label": labels.index.get(entry["class_folder"], -1),
            "label_text": labels.text.get(entry["class_folder"], ""),
            **(probes[i] if i in probes else {**empty, "status": entry["status"], "reason": entry["reason"]}),
        }
        for i, entry in enumerate(entries)
    ]
    frame = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    frame = frame.astype(
        {"label": "int64", "width": "int64", "height": "int64", "bytes": "int64", "mtime_ns": "int64",
         "ctime_ns": "int64", "inode": "uint64"}
    )
    frame.attrs["reused_rows"] = reused
    frame.attrs["rewritten_files"] = len(rewritten)
    # a few for the log (attrs are copied along with the frame: never a list as long as the source)
    frame.attrs["rewritten_examples"] = [entries[i]["id"] for i in sorted(rewritten)[:10]]
    return frame, labels


def class_data_versions(frame: pd.DataFrame, labels: ClassLabels) -> dict[str, str]:
    """Per class: a data version of its source files, from the manifest (each file's id, size,
    modification time, status and reason, and its ``change`` stamp where it has one) and the class's
    label index and text.

    Equal versions mean the class's crops, latents and shards would be rebuilt byte for byte; a
    changed, added, removed or renamed file, a file rewritten in place (a stamp, see ``scan_source``)
    or a new label changes it. A row without a stamp contributes exactly what it did before stamps
    existed, so the classes of a source that did not change keep the versions earlier releases
    recorded (an upgrade rebuilds nothing). Classes without files get a version too (their folder
    exists)."""
    import hashlib

    import numpy as np

    columns = ["id", "bytes", "mtime_ns", "status", "reason"]
    # stamps are rare: the rows are sorted with them only when there are some (1.5 s at ImageNet size)
    stamped = "change" in frame.columns and bool(frame["change"].fillna("").ne("").any())
    selected = ["class_folder", *columns, *(["change"] if stamped else [])]
    rows = frame.loc[frame["class_folder"] != "", selected].sort_values(["class_folder", "id"])
    # one line per file, "id\0bytes\0mtime_ns\0status\0reason\n" ("...\0reason\0change\n" for a row with a
    # stamp), the classes' lines consecutive: one pass over plain lists (a sort and a loop over rows per
    # class took 3.5 s at ImageNet size)
    lines = ["\0".join(map(str, row)) + "\n" for row in zip(*(rows[c].tolist() for c in columns))]
    if stamped:
        stamps = rows["change"].fillna("").astype(str).to_numpy()
        for k in np.flatnonzero(stamps != "").tolist():
            lines[k] = f"{lines[k][:-1]}\0{stamps[k]}\n"
    folders = rows["class_folder"].to_numpy()
    bounds = np.concatenate([[0], np.flatnonzero(folders[1:] != folders[:-1]) + 1, [len(folders)]]).tolist()
    spans = {folders[a]: (a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a}
    versions = {}
    for name in labels.index:
        digest = hashlib.sha256(f"{labels.index[name]}\0{labels.text[name]}\0".encode("utf-8", "surrogateescape"))
        if name in spans:
            a, b = spans[name]
            digest.update("".join(lines[a:b]).encode("utf-8", "surrogateescape"))
        versions[name] = digest.hexdigest()[:24]
    return versions
