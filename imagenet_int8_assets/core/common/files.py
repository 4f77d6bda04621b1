"""Atomic files and folders: every writer of the output writes through these.

Every partition folder is written to a hidden sibling (``.tmp-<name>-<random>``) and swapped in
with renames, so a killed run never leaves a half-written folder under a real name; leftovers
are removed the next time that partition is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"


def file_hash(path: str | os.PathLike, algo: str) -> str:
    """Hex digest of a file, read in 4 MiB blocks; ``algo`` is a hashlib name or an xxhash one
    (``xxh3_64``, ..., as MDS indexes record them)."""
    if algo.startswith("xxh"):
        import xxhash

        digest = getattr(xxhash, algo)()
    else:
        digest = hashlib.new(algo)
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file."""
    return file_hash(path, "sha256")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def remove_leftovers(parent: Path, name: str | None = None) -> list[Path]:
    """Delete temporary/trash siblings left by killed runs (for ``name``, or all of them)."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        for prefix in (TMP_PREFIX, TRASH_PREFIX):
            if entry.name.startswith(prefix) and (
                name is None or entry.name.startswith(f"{prefix}{name}-")
            ):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


@contextmanager
def staging_dir(parent: str | os.PathLike, name: str | None = None, clean_leftovers: bool = True) -> Iterator[Path]:
    """Yield a new hidden folder ``parent/.tmp-<name>-<random>`` (``.tmp-<random>`` without a name)
    to write into; whatever is still there when the block ends (an exception, or the caller did
    not move it into place) is deleted.

    ``clean_leftovers`` first removes the ``.tmp-``/``.trash-`` siblings that killed runs left
    (for ``name``; every one in ``parent`` without a name). Only writers that are alone in
    ``parent`` (one run per partition) may clean; a writer that can run concurrently with itself
    passes False, or it would delete the other's folder in progress.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    if clean_leftovers:
        remove_leftovers(parent, name)
    token = uuid.uuid4().hex[:8]
    tmp = parent / (f"{TMP_PREFIX}{name}-{token}" if name else f"{TMP_PREFIX}{token}")
    tmp.mkdir()
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(staged: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the finished folder ``staged`` to ``final``, replacing what is there as a whole.

    An existing ``final`` is first renamed to a ``.trash-`` sibling and deleted once the new one is
    in place; should that last rename fail, the old folder is put back, so ``final`` is always
    either the old folder or the new one. Both must be on the same file system (siblings are).
    """
    staged, final = Path(staged), Path(final)
    trash = final.parent / f"{TRASH_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(final, trash)
    except FileNotFoundError:
        trash = None
    try:
        os.rename(staged, final)
    except BaseException:
        if trash is not None and not final.exists():
            os.rename(trash, final)  # put the previous folder back
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


@contextmanager
def atomic_dir(final: str | os.PathLike, clean_leftovers: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final`` as a whole.

    The one way every writer of a folder writes it (partitions, the report, the probe, CIFAR
    exports, the sample source): written aside in ``staging_dir``, swapped in by
    ``move_into_place``. On an exception the temporary folder is deleted and ``final`` is left as
    it was; a run killed mid-write leaves only hidden ``.tmp-``/``.trash-`` siblings, which the
    next write of ``final`` removes (unless ``clean_leftovers`` is False, see ``staging_dir``).
    """
    final = Path(final)
    with staging_dir(final.parent, final.name, clean_leftovers) as tmp:
        yield tmp
        move_into_place(tmp, final)


def write_folder(final: str | os.PathLike, files: dict[str, bytes]) -> Path:
    """Replace ``final`` with a folder holding exactly ``files`` (name -> bytes), via ``atomic_dir``."""
    with atomic_dir(final) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return Path(final)


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under ``folder`` (0 when it does not exist): what a partition occupies."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name), follow_symlinks=False).st_size
            except OSError:
                pass
    return total


def bytes_per_image(nbytes: int, images: int) -> float:
    """``nbytes / images`` rounded to 0.1 byte (0 for no image): the ``bytes_per_image`` metadata."""
    return round(nbytes / images, 1) if images else 0.0
