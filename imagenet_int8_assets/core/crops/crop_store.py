"""How one class's crops are kept on disk (``IMAGENET_INT8_CROP_STORAGE``), read back the same way
whatever the mode.

=======  =============================================  ==========================================
mode     files under ``crops/<class>/``                 bytes per 256x256 crop, cost
=======  =============================================  ==========================================
``raw``  ``images.npy``: uint8 (N, S, S, 3), C order    196,608 (S*S*3); memory-mapped, fastest
``png``  ``images/<row>.png``: lossless, level 1        ~0.6x raw on photographs; ~5-8 ms to write
``none`` no pixels, only ``meta.json``                  ~150 B; the crop is recomputed when read
=======  =============================================  ==========================================

``meta.json`` is the same in every mode: ``ids``, ``failed``, ``recipe``, ``size``, ``max_pixels``,
``count``, ``storage``, ``sha256`` (per image, of the crop's pixels: its S*S*3 bytes in C order),
``source_root`` and ``source`` (per image, the source file's ``bytes`` and ``mtime_ns`` when the
crop was made). With ``none`` a reader recomputes each crop from ``source_root / id`` with the
recorded recipe, size and pixel limit and VERIFIES it against the recorded hash; a source file
that changed, vanished or no longer crops raises ``CropVerificationError`` naming the files and
what to re-materialize. ``png`` crops are verified against the same hashes when decoded.

A failed verification is also recorded in the class's folder (``verification-failed.json``, see
``record_verification_failure``) until the class's crops are written again: `imagenet-int8 build`
rebuilds every class that has one (build.plan), so its advice leads somewhere even when the scan
cannot see the change (a file rewritten in place before this release recorded ctimes, a file
system without reliable ctimes, a damaged PNG).

A crop box is not recorded: both recipes resample the whole image (bicubic support reaches
beyond the box, ``adm`` first halves the image), so a box alone does not reproduce the crop; the
source file, recipe, size and pixel limit do.

``read_crops`` returns the pixels of ``raw`` crops as a numpy array (memory-mapped on request) and
those of ``png`` and ``none`` crops as a ``CropArray``: an (N, S, S, 3) uint8 array-like that
computes rows when indexed (a list or array of row numbers computes only those rows, as the
report does; anything else computes the whole class once, on ``workers`` processes, and keeps it).
No Dagster import.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.files import atomic_dir, atomic_write_json
from imagenet_int8_assets.core.common.layout import MissingArtifact, crops_dir, read_meta
from imagenet_int8_assets.core.common.parallel import map_ordered
from imagenet_int8_assets.core.crops.preprocess import crop_task, crop_tasks
from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS

CROP_STORAGES = ("raw", "png", "none")
# The default keeps a full ImageNet build's intermediates well under the 140 GB of the source
# (docs/OUTPUT.md: "Disk footprint"): raw crops alone would take 252 GB, PNG about 151 GB.
DEFAULT_CROP_STORAGE = "none"
PNG_COMPRESS_LEVEL = 1
RAW_FILE = "images.npy"
PNG_FOLDER = "images"
META_FILE = "meta.json"
# Written next to meta.json when stored crops fail verification; gone when the class is written again
# (write_class_crops replaces the whole folder).
VERIFICATION_FAILED_FILE = "verification-failed.json"
PIXEL_HASH = "sha256"
# Encoding PNGs releases the GIL in zlib, so a few threads go faster than one.
PNG_THREADS = min(8, os.cpu_count() or 1)


class CropVerificationError(ValueError):
    """Crops that cannot be read back as they were recorded (a source file changed, vanished or no
    longer crops, or a stored PNG was damaged). ``paths`` names the files; ``source_missing`` is
    True when every problem is a missing source file (a vanished class)."""
    def __init__(self, message: str, paths: Sequence[str] = (), source_missing: bool = False):
        super().__init__(message)
        self.paths = list(paths)
        self.source_missing = source_missing


def check_crop_storage(value: str) -> str:
    if value not in CROP_STORAGES:
        raise ValueError(f"unknown crop storage {value!r}: use one of {', '.join(CROP_STORAGES)}")
    return value


def expected_bytes(storage: str, count: int, size: int) -> int:
    """About what ``count`` crops of ``size`` take in ``storage`` (for the disk-full estimate, before
    writing): raw exactly, PNG at the ~0.6x of photographs, none ~160 bytes of meta.json per image."""
    raw = count * size * size * 3
    return {"raw": raw, "png": int(raw * 0.6), "none": count * 160}[check_crop_storage(storage)]


def pixel_hash(crop: np.ndarray) -> str:
    """sha256 (hex) of a crop's pixels: its uint8 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(crop, dtype=np.uint8).data).hexdigest()


def png_name(row: int) -> str:
    return f"{row:06d}.png"


def encode_png(crop: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(crop, dtype=np.uint8), "RGB").save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL
    )
    return buffer.getvalue()


def decode_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _source_stat(path: Path) -> tuple[int, int]:
    """(bytes, mtime_ns) of a source file, (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _recorded_root(output: Path, source_root: Path) -> dict:
    """How ``meta.json`` names the source: relative to the output when inside it (the bundled
    sample, a CIFAR-10 export), so a moved output keeps working; else absolute."""
    source_root = Path(source_root).resolve()
    output = Path(output).resolve()
    if source_root.is_relative_to(output):
        return {"source_root": source_root.relative_to(output).as_posix(), "source_root_in_output": True}
    return {"source_root": str(source_root), "source_root_in_output": False}


def write_class_crops(
    output: str | os.PathLike,
    final: Path,
    ids: list[str],
    images: np.ndarray,
    meta: dict,
    storage: str = "raw",
    source_root: str | os.PathLike | None = None,
) -> Path:
    """Store one class's crops as ``storage`` into ``final`` (atomically, see ``common.files.atomic_dir``).

    ``images`` is uint8 (N, S, S, 3), rows in the order of ``ids``; ``meta`` carries at least
    ``recipe`` and ``size`` (and ``max_pixels``, else the default limit) for ``none``, which also
    needs ``source_root`` (the folder the ids are relative to).
    """
    check_crop_storage(storage)
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] != len(ids):
        raise ValueError(f"crops must be (N, S, S, 3) with N == len(ids); got {images.shape}")
    if storage == "none" and (source_root is None or "recipe" not in meta or "size" not in meta):
        raise ValueError("crop storage 'none' needs the source root and the recipe and size in meta to recompute crops")
    record = {
        **meta,
        "ids": list(ids),
        "count": len(ids),
        "storage": storage,
        "pixel_hash": PIXEL_HASH,
        PIXEL_HASH: [pixel_hash(image) for image in images],
    }
    if source_root is not None:
        root = Path(source_root)
        stats = [_source_stat(root / i) for i in ids]
        record.update(_recorded_root(Path(output), root))
        record["source"] = {"bytes": [s[0] for s in stats], "mtime_ns": [s[1] for s in stats]}
    with atomic_dir(final) as tmp:
        if storage == "raw":
            np.save(tmp / RAW_FILE, images, allow_pickle=False)
        elif storage == "png":
            folder = tmp / PNG_FOLDER
            folder.mkdir()
            with ThreadPoolExecutor(PNG_THREADS) as pool:
                for row, data in enumerate(pool.map(encode_png, images)):
                    (folder / png_name(row)).write_bytes(data)
        atomic_write_json(tmp / META_FILE, record)
    return final


class CropArray:
    """A class's crops as a read-only (N, S, S, 3) uint8 array-like whose rows are computed on
    demand by ``load_rows(rows) -> array``: indexing with an int or a list/array of ints computes
    those rows only; anything else (slices, ``np.asarray``) computes every row once and keeps them."""
    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, count: int, size: int, load_rows: Callable[[list[int]], np.ndarray], what: str):
        self.shape = (count, size, size, 3)
        self._load_rows = load_rows
        self._all: np.ndarray | None = None
        self.what = what

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CropArray({self.what}, shape={self.shape}, loaded={self._all is not None})"

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape))

    def load(self) -> np.ndarray:
        """Every row (computed once, then kept)."""
        if self._all is None:
            n, size = self.shape[0], self.shape[1]
            self._all = self._load_rows(list(range(n))) if n else np.empty((0, size, size, 3), np.uint8)
        return self._all

    def __array__(self, dtype=None, copy=None):
        arr = self.load()
        return arr if dtype is None else arr.astype(dtype)

    def __getitem__(self, key):
        if self._all is not None:
            return self._all[key]
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            row = int(key) + (n if key < 0 else 0)
            if not 0 <= row < n:
                raise IndexError(f"row {key} out of range for {n} crops")
            return self._load_rows([row])[0]
        if isinstance(key, (list, np.ndarray)):
            rows = np.asarray(key)
            if rows.ndim == 1 and rows.dtype.kind in "iu":
                rows = np.where(rows < 0, rows + n, rows)
                if rows.size and (rows.min() < 0 or rows.max() >= n):
                    raise IndexError(f"rows out of range for {n} crops")
                if not rows.size:
                    return np.empty((0, *self.shape[1:]), np.uint8)
                return self._load_rows([int(r) for r in rows])
        return self.load()[key]


def _verify(meta: dict, rows: list[int], crops: list[np.ndarray | None]) -> list[int]:
    """The positions in ``rows`` whose crop is missing or does not match the recorded hash."""
    hashes = meta.get(PIXEL_HASH)
    size = int(meta["size"])
    bad = []
    for k, (row, crop) in enumerate(zip(rows, crops)):
        if crop is None or crop.shape != (size, size, 3) or (hashes is not None and pixel_hash(crop) != hashes[row]):
            bad.append(k)
    return bad


def _when(mtime_ns: int) -> str:
    import datetime

    stamp = datetime.datetime.fromtimestamp(mtime_ns / 1e9, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%d %H:%M:%S.%f UTC")


def record_verification_failure(folder: Path, class_folder: str, problem: str, paths: Sequence[str]) -> Path | None:
    """Record in the class's crops folder that its stored crops failed verification, so that
    `imagenet-int8 build` rebuilds the class (``verification_failure``); None when the folder cannot
    be written (a read-only copy of an output)."""
    path = Path(folder) / VERIFICATION_FAILED_FILE
    try:
        atomic_write_json(path, {"class": class_folder, "problem": problem, "paths": list(paths)[:100]})
    except OSError:
        return None
    return path


def verification_failure(folder: Path) -> dict | None:
    """The recorded verification failure of a class's crops (``record_verification_failure``), or None."""
    import json

    path = Path(folder) / VERIFICATION_FAILED_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"problem": f"{path} is unreadable"}  # still a failure: the class is rebuilt


def _rebuild_advice(class_folder: str, recorded: Path | None) -> str:
    """What fixes a class whose crops no longer verify: both ways rewrite its crops from the source as it
    is now, then everything made from them."""
    manual = (
        f"re-materialize raw_manifest, then preprocessed_crops, vae_latents and mds_shards for class "
        f"{class_folder!r}, then the dataset assets (quantization_stats, mds_dataset, reconstruction_report, "
        "probe_features, latent_probe)."
    )
    if recorded is None:  # nothing tells the build about this class: only the exact steps lead somewhere
        return manual[0].upper() + manual[1:]
    return (
        f"Run `imagenet-int8 build`: it rebuilds class {class_folder!r} (this failure is recorded in {recorded} "
        f"until the class is rebuilt); or {manual}"
    )


def _png_loader(folder: Path, meta: dict, class_folder: str) -> Callable[[list[int]], np.ndarray]:
    def load_rows(rows: list[int]) -> np.ndarray:
        paths = [folder / PNG_FOLDER / png_name(r) for r in rows]

        def read(path: Path):
            try:
                return decode_png(path)
            except (OSError, ValueError, SyntaxError):
                return None

        with ThreadPoolExecutor(PNG_THREADS) as pool:
            crops = list(pool.map(read, paths))
        bad = _verify(meta, rows, crops)
        if bad:
            named = [str(paths[k]) for k in bad]
            problem = (
                f"{len(bad)} stored crop(s) of class {class_folder!r} are missing, unreadable or do not match their "
                f"recorded sha256: {', '.join(named[:3])}{' ...' if len(named) > 3 else ''}."
            )
            record = record_verification_failure(folder, class_folder, problem, named)
            raise CropVerificationError(f"{problem} {_rebuild_advice(class_folder, record)}", named)
        return np.stack(crops)

    return load_rows


def _source_loader(
    root: Path, meta: dict, class_folder: str, workers: int, folder: Path
) -> Callable[[list[int]], np.ndarray]:

    ids = list(meta["ids"])
    recipe, size = meta["recipe"], int(meta["size"])
    max_pixels = int(meta.get("max_pixels", DEFAULT_MAX_PIXELS))
    recorded = meta.get("source") or {}

    def load_rows(rows: list[int]) -> np.ndarray:
        tasks = crop_tasks(root, [ids[r] for r in rows], recipe, size, max_pixels)
        paths = [Path(t.path) for t in tasks]
        results = list(map_ordered(crop_task, tasks, workers if len(rows) > 1 else 1, chunksize=8))
        crops = [arr for arr, _ in results]
        bad = _verify(meta, rows, crops)
        if not bad:
            return np.stack(crops)
        problems, missing = [], 0
        for k in bad:
            row, path = rows[k], paths[k]
            now = _source_stat(path)
            was = (
                (recorded["bytes"][row], recorded["mtime_ns"][row]) if "bytes" in recorded else (None, None)
            )
            if now[0] < 0:
                missing += 1
                problems.append(f"{path} is gone")
            elif crops[k] is None:
                problems.append(f"{path} no longer crops ({results[k][1]})")
            elif was != (None, None) and tuple(now) != tuple(was):
                problems.append(
                    f"{path} changed since its crop was recorded (size {was[0]:,} -> {now[0]:,} bytes, modified "
                    f"{_when(was[1])} -> {_when(now[1])}) and its crop's sha256 differs"
                )
            else:
                problems.append(
                    f"{path} has the size and modification time it had, but its crop's sha256 differs from the "
                    "recorded one (its content was rewritten in place, or another Pillow version crops differently)"
                )
        problem = (
            f"Class {class_folder!r}: {len(bad)} of the {len(rows)} crop(s) recomputed from the source do not match "
            f"the crops recorded by preprocessed_crops (IMAGENET_INT8_CROP_STORAGE=none keeps no pixels): "
            f"{'; '.join(problems[:3])}{f'; and {len(problems) - 3} more' if len(problems) > 3 else ''}."
        )
        named = [str(paths[k]) for k in bad]
        record = record_verification_failure(folder, class_folder, problem, named)
        raise CropVerificationError(
            f"{problem} {_rebuild_advice(class_folder, record)}", named, source_missing=missing == len(bad)
        )

    return load_rows


def source_root_of(output: Path, meta: dict, source_root: str | os.PathLike | None) -> Path | None:
    """The folder the crops' ids are relative to: ``source_root`` when given, else the recorded one."""
    if source_root is not None:
        return Path(source_root)
    recorded = meta.get("source_root")
    if recorded is None:
        return None
    return Path(output) / recorded if meta.get("source_root_in_output") else Path(recorded)


def open_class_crops(
    output: str | os.PathLike,
    folder: Path,
    class_folder: str,
    meta: dict,
    mmap: bool = False,
    source_root: str | os.PathLike | None = None,
    workers: int = 1,
):
    """The pixels of one class's crops as written by ``write_class_crops`` (a numpy array for
    ``raw``, a ``CropArray`` for ``png`` and ``none``)."""
    storage = meta.get("storage", "raw")  # crops written before the setting existed are raw
    count = len(meta["ids"])
    if storage == "raw":
        # numpy cannot map a zero-length array: read empty classes normally
        use_mmap = mmap and count > 0
        return np.load(folder / RAW_FILE, mmap_mode="r" if use_mmap else None, allow_pickle=False)
    size = int(meta["size"])
    if storage == "png":
        return CropArray(count, size, _png_loader(folder, meta, class_folder), f"png {folder}")
    if storage == "none":
        root = source_root_of(Path(output), meta, source_root)
        if root is None:
            raise CropVerificationError(
                f"{folder / META_FILE} records no source folder to recompute its crops from: pass source_root, or "
                f"re-materialize preprocessed_crops for class {class_folder!r}."
            )
        loader = _source_loader(root, meta, class_folder, workers, folder)
        return CropArray(count, size, loader, f"recomputed from {root}")
    raise CropVerificationError(
        f"{folder / META_FILE} records crop storage {storage!r}, which this version cannot read: re-materialize "
        f"preprocessed_crops for class {class_folder!r}."
    )


# --------------------------------------------------------------------------------------------
# One class's crops by output and class name


def write_crops(
    output: str | os.PathLike,
    class_folder: str,
    ids: list[str],
    images: np.ndarray,
    meta: dict,
    storage: str = "raw",
    source_root: str | os.PathLike | None = None,
) -> Path:
    """Store one class's crops atomically. ``images`` is uint8 (N, S, S, 3).

    ``storage`` is ``raw``, ``png`` or ``none`` (``IMAGENET_INT8_CROP_STORAGE``; see
    ``core.crops.crop_store``); ``source_root``, the folder the ids are relative to, is recorded so that
    ``none`` crops can be recomputed (and verified) from the source.
    """
    return write_class_crops(
        output, crops_dir(output, class_folder), ids, images, meta, storage=storage, source_root=source_root
    )


def read_crops(
    output: str | os.PathLike,
    class_folder: str,
    mmap: bool = False,
    source_root: str | os.PathLike | None = None,
    workers: int = 1,
) -> tuple[list[str], np.ndarray]:
    """One class's crops: (ids, uint8 array N x S x S x 3), rows in the order of ``ids``, whatever
    the crop storage they were written with.

    ``raw`` crops come back as a numpy array (``mmap=True`` maps the file instead of reading it,
    for classes larger than memory). ``png`` and ``none`` crops come back as a
    ``crop_store.CropArray`` that decodes (``png``) or recomputes from the source (``none``) rows
    when indexed, on ``workers`` processes for a whole class, and verifies each against the sha256
    recorded when the crops were made (``CropVerificationError`` names the files that changed).
    ``source_root`` replaces the source folder recorded for ``none`` crops (a moved source).
    """
    ids, images, _ = read_crops_with_meta(output, class_folder, mmap=mmap, source_root=source_root, workers=workers)
    return ids, images


def read_crops_with_meta(
    output: str | os.PathLike,
    class_folder: str,
    mmap: bool = False,
    source_root: str | os.PathLike | None = None,
    workers: int = 1,
) -> tuple[list[str], np.ndarray, dict]:
    """``read_crops`` and the crops' ``meta.json``."""
    folder = crops_dir(output, class_folder)
    meta = read_meta(folder, "crops", "preprocessed_crops")
    ids = list(meta["ids"])
    images = open_class_crops(output, folder, class_folder, meta, mmap=mmap, source_root=source_root, workers=workers)
    if images.shape[0] != len(ids):
        raise MissingArtifact(f"{folder}: {images.shape[0]} crops but {len(ids)} ids; re-materialize it")
    return ids, images, meta
