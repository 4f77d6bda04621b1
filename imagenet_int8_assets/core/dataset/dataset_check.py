"""Checking a built dataset before it is read: damage is reported, never decoded into wrong latents.

``check_dataset(root)`` reads ``root/index.json`` and verifies every shard it names: the file
exists, has the recorded size, starts with the sample count the index records (and has room for
that many samples), and (``verify="hash"``, the default) has the recorded xxh3_64 hash (or another
recorded hash when that one is absent). Readers trust the index's counts (streaming sizes the
dataset with them, ``load_latents`` allocates with them), so a count that disagrees with its shard
would silently drop or invent samples, or exhaust memory: it is damage like any other. It also
returns how to decode the codes: the latent shape and range from the index's ``imagenet_int8``
record, else ``build.json``, else the published defaults. Anything wrong raises
``DatasetDamaged``, one line naming the file, what is wrong with it and how to repair it. The
published Imagenet.int8 records no hashes: then only sizes and sample counts are verified, and the
result says so.

Needs only ``json``, ``hashlib``, ``xxhash`` and the layout names of ``mds_index`` (no Dagster;
mosaicml-streaming only to decompress compressed shards, which this project never writes).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from imagenet_int8_assets.core.dataset.mds_index import BUILD_INFO, CLASSES, CURRENT, INDEX, RECORD_KEY
from imagenet_int8_assets.core.dataset.mds_index import LATENT_SHAPE as PUBLISHED_SHAPE
from imagenet_int8_assets.core.latents.quantize import DEFAULT_RANGE, recorded_range
from imagenet_int8_assets.core.common.files import file_hash

VERIFY_MODES = ("hash", "size", "none")
# Preferred first: xxh3_64 (what our shards record, several GB/s), then the other fast ones.
FAST_HASHES = ("xxh3_64", "xxh3_128", "xxh64", "xxh128", "xxh32")
REBUILD_DATASET = "re-run the merged dataset step (materialize mds_dataset)"
MAX_LISTED = 3
COUNT_BYTES = 4  # an MDS shard starts with its sample count: uint32, little-endian


class DatasetDamaged(Exception):
    """A dataset file is missing, truncated, changed or unreadable. The message names the file,
    what is wrong with it and how to repair it; ``problems`` lists every damaged file found."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


@dataclass(frozen=True)
class DecodeParams:
    """How the dataset's uint8 codes decode: ``z = (u / 255 - 0.5) * 2 * value_range``."""

    latent_shape: tuple[int, ...] = PUBLISHED_SHAPE
    value_range: float = DEFAULT_RANGE
    source: str = "published defaults (no build record)"


@dataclass
class DatasetCheck:
    """What ``check_dataset`` found: the parsed index, the decode parameters and what it verified."""

    root: Path
    index: dict
    decode: DecodeParams
    verify: str
    shards: int = 0
    bytes: int = 0
    hashed: int = 0  # shards whose content hash was compared
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def verified(self) -> str:
        if self.verify == "none":
            return "nothing (verify='none')"
        if self.verify == "size" or self.hashed == 0:
            return f"existence and size of {self.shards} shard(s)"
        if self.hashed < self.shards:
            return f"size of {self.shards} shard(s), content hash of {self.hashed} (the others record no hash)"
        return f"existence, size and content hash of {self.shards} shard(s)"


def _damaged_index(path: Path, what: str) -> DatasetDamaged:
    return DatasetDamaged(f"Dataset damaged: {path} {what}; {REBUILD_DATASET} to write it again.")


def load_index(root: str | os.PathLike) -> dict:
    """``root/index.json`` parsed and checked for the fields readers need (else ``DatasetDamaged``)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"No dataset at {root}: the folder does not exist. Pass the dataset folder (<output>/mds, or a "
            "download of Imagenet.int8)."
        )
    path = root / INDEX
    if not path.is_file():
        raise _damaged_index(path, "is missing" if not path.exists() else "is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _damaged_index(path, f"is not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as exc:
        cut = exc.pos >= len(text.rstrip())
        what = "is truncated" if cut else f"is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        raise _damaged_index(path, f"{what} ({len(raw)} bytes)") from None
    if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
        raise _damaged_index(path, "has no 'shards' list (not an MDS index)")
    for i, shard in enumerate(index["shards"]):
        problem = _shard_entry_problem(shard)
        if problem:
            raise _damaged_index(path, f"has a malformed entry for shard {i}: {problem}")
    return index


# The fields of an MDS shard entry (streaming's MDSReader.from_json takes exactly these).
SHARD_FIELDS = frozenset(
    ("column_encodings", "column_names", "column_sizes", "compression", "format", "hashes", "raw_data",
     "samples", "size_limit", "version", "zip_data")
)


def _shard_entry_problem(shard) -> str | None:
    if not isinstance(shard, dict):
        return "not an object"
    raw = shard.get("raw_data")
    if not isinstance(raw, dict):
        return "no raw_data"
    basename = raw.get("basename")
    if not isinstance(basename, str) or not basename:
        return "no raw_data.basename"
    if not _inside(basename):
        return f"raw_data.basename {basename!r} points outside the dataset folder"
    if set(shard) != SHARD_FIELDS:
        missing, extra = sorted(SHARD_FIELDS - set(shard)), sorted(set(shard) - SHARD_FIELDS)
        return f"{basename!r} has " + "; ".join(
            ([f"no {', '.join(missing)}"] if missing else []) + ([f"unknown field(s) {', '.join(extra)}"] if extra else [])
        )
    if shard["format"] != "mds" or shard["version"] != 2:
        return f"{basename!r} is not an MDS version 2 shard (format {shard['format']!r}, version {shard['version']!r})"
    if set(raw) != {"basename", "bytes", "hashes"} or not isinstance(raw["hashes"], dict):
        return f"raw_data of {basename!r} must hold exactly basename, bytes and hashes"
    if not isinstance(raw.get("bytes"), int) or raw["bytes"] < 0:
        return f"no valid raw_data.bytes for {basename!r}"
    if not isinstance(shard.get("samples"), int) or shard["samples"] < 0:
        return f"no valid sample count for {basename!r}"
    names, encodings, sizes = shard.get("column_names"), shard.get("column_encodings"), shard.get("column_sizes")
    if not isinstance(names, list) or not isinstance(encodings, list) or len(names) != len(encodings):
        return f"no matching column_names and column_encodings for {basename!r}"
    if not isinstance(sizes, list) or len(sizes) != len(names) or not all(
        s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0) for s in sizes
    ):
        return f"no column_sizes (a size or null per column) for {basename!r}"
    return None


def _inside(basename: str) -> bool:
    """A relative POSIX path that stays inside the dataset folder."""
    parts = PurePosixPath(basename).parts
    return bool(parts) and not basename.startswith("/") and "\\" not in basename and ".." not in parts and ":" not in parts[0]


def _file_entry_ok(entry: dict) -> bool:
    basename = entry.get("basename")
    return isinstance(basename, str) and _inside(basename) and isinstance(entry.get("bytes"), int)


def decode_params(root: str | os.PathLike, index: dict) -> DecodeParams:
    """Shape and range of the codes: index.json's build record, else build.json, else the published."""
    root = Path(root)
    record, source = index.get(RECORD_KEY), f"{root / INDEX} ('{RECORD_KEY}')"
    if not isinstance(record, dict):
        record, source = None, str(root / BUILD_INFO)
        path = root / BUILD_INFO
        if path.is_file():
            try:
                record = json.loads(path.read_bytes().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise _damaged_index(path, "is not valid JSON") from None
            if not isinstance(record, dict):
                raise _damaged_index(path, "is not a JSON object")
    if record is None:
        return DecodeParams()
    shape = record.get("latent_shape", PUBLISHED_SHAPE)
    if not (isinstance(shape, (list, tuple)) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        raise DatasetDamaged(f"Dataset damaged: {source} has an invalid latent_shape {shape!r}; {REBUILD_DATASET}.")
    try:
        value_range = recorded_range(record)
    except ValueError as exc:
        raise DatasetDamaged(f"Dataset damaged: {source} has an {exc}; {REBUILD_DATASET}.") from None
    return DecodeParams(tuple(shape), value_range, source)


def _check_columns(root: Path, index: dict, decode: DecodeParams) -> None:
    """The latent columns' encodings must agree with the decode parameters (else wrong latents)."""
    size = math.prod(decode.latent_shape)
    for shard in index["shards"]:
        for name, encoding in zip(shard["column_names"], shard["column_encodings"]):
            if not str(name).startswith("vae_output"):
                continue
            if encoding == "uint8":
                ok = size == math.prod(PUBLISHED_SHAPE)
            elif isinstance(encoding, str) and encoding.startswith("ndarray:uint8:"):
                ok = encoding.split(":", 2)[2] == ",".join(str(d) for d in decode.latent_shape)
            else:
                ok = False
            if not ok:
                raise DatasetDamaged(
                    f"Dataset damaged: {root / INDEX} stores {name!r} of {shard['raw_data']['basename']} as "
                    f"{encoding!r}, which does not hold latents of shape {decode.latent_shape} (from "
                    f"{decode.source}); {REBUILD_DATASET}."
                )


def _hash_to_check(hashes) -> str | None:
    if not isinstance(hashes, dict) or not hashes:
        return None
    for algo in FAST_HASHES:
        if algo in hashes:
            return algo
    return next((a for a in sorted(hashes) if a in hashlib.algorithms_available), None)


def class_of_shard(root: Path, basename: str) -> str | None:
    """The class a shard belongs to, from its path; None for a flat (published) layout.

    ``classes/<class-dir>/<version>/shard...`` (this project's layout, merged or opened per class
    version), ``<class>/shard...`` (the layout before versions). The class's own name comes from
    its ``current.json`` when there is one.
    """
    path = (root / basename).absolute()
    parts = path.parts
    class_dir = None
    if len(parts) >= 4 and parts[-4] == CLASSES:
        class_dir, home = parts[-3], path.parent.parent
    elif len(PurePosixPath(basename).parts) == 2:
        class_dir, home = PurePosixPath(basename).parts[0], None
    if class_dir is None:
        return None
    if home is not None:
        try:
            name = json.loads((home / CURRENT).read_text(encoding="utf-8")).get("class")
            if isinstance(name, str) and name:
                return name
        except (OSError, ValueError, AttributeError):
            pass
    return class_dir


def _repair(root: Path, basename: str) -> str:
    name = class_of_shard(root, basename)
    if name is None:
        return (
            "re-download this shard (the published Imagenet.int8) or rebuild the dataset "
            "(materialize mds_shards for every class, then mds_dataset)"
        )
    return f"rebuild class {name!r} (materialize mds_shards for that partition, then mds_dataset)"


def sample_count(data) -> int | None:
    """The sample count an MDS shard starts with (uint32 little-endian), from its first bytes
    (``bytes``, a memoryview or a uint8 array); None when there are fewer than 4. The one reader of
    that header: ``check_dataset`` and ``load_latents`` both use it."""
    view = memoryview(data).cast("B")
    return struct.unpack_from("<I", view)[0] if view.nbytes >= COUNT_BYTES else None


def min_sample_bytes(shard: dict, latent_bytes: int) -> int:
    """The fewest bytes one sample of ``shard`` can take: each fixed-size column's size, and for a
    variable-size column its 4-byte size field, plus ``latent_bytes`` for a latent (``vae_output*``)."""
    total = 0
    for name, size in zip(shard["column_names"], shard["column_sizes"]):
        total += size if size else COUNT_BYTES + (latent_bytes if str(name).startswith("vae_output") else 0)
    return total


def _count_problem(root: Path, shard: dict, latent_bytes: int) -> str | None:
    """What is wrong with the sample count of ``shard``: its file must start with the count the
    index records and be long enough for that many samples (their offsets table, and each sample's
    smallest size). Reads the first 4 bytes (a compressed shard is decompressed first)."""
    path = root / shard["raw_data"]["basename"]
    packed = shard.get("zip_data")
    try:
        if not path.exists() and isinstance(packed, dict) and _file_entry_ok(packed) and shard.get("compression"):
            from streaming.base.compression import decompress

            path = root / packed["basename"]
            compressed = path.read_bytes()
            try:
                data = decompress(shard["compression"], compressed)
            except Exception as exc:  # noqa: BLE001 - each codec raises its own error type for corrupt input
                return f"{path} cannot be decompressed as {shard['compression']!r} ({type(exc).__name__})"
            head, size = data[:COUNT_BYTES], len(data)
        else:
            with open(path, "rb") as fh:
                head, size = fh.read(COUNT_BYTES), os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    count, recorded = sample_count(head), shard["samples"]
    if count is None:
        return f"{path} is too short to start with its sample count ({size:,} bytes)"
    if count != recorded:
        return f"{path} holds {count:,} samples (the count it starts with), {INDEX} says {recorded:,}"
    need = COUNT_BYTES * (count + 2) + count * min_sample_bytes(shard, latent_bytes)
    if size < need:
        return f"{path} has {size:,} bytes, too few for the {count:,} samples it and {INDEX} record (at least {need:,})"
    return None


def _shard_problem(root: Path, shard: dict, verify: str, check: DatasetCheck) -> str | None:
    raw = shard["raw_data"]
    path = root / raw["basename"]
    packed = shard.get("zip_data")
    if not path.exists() and isinstance(packed, dict) and _file_entry_ok(packed):
        raw, path = packed, root / packed["basename"]  # compressed: streaming unpacks it when read
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        missing = path.parent
        while missing != root and not missing.parent.exists():
            missing = missing.parent
        where = f" (the folder {missing} does not exist)" if missing != root and not missing.exists() else ""
        return f"{path} is missing{where}"
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if size != raw["bytes"]:
        what = "truncated" if size < raw["bytes"] else "longer than recorded"
        return f"{path} is {what} ({size:,} bytes, {INDEX} says {raw['bytes']:,})"
    problem = _count_problem(root, shard, math.prod(check.decode.latent_shape))
    if problem:
        return problem
    if verify == "hash":
        algo = _hash_to_check(raw.get("hashes"))
        if algo is not None:
            try:
                actual = file_hash(path, algo)
            except OSError as exc:
                return f"{path} cannot be read ({exc.strerror})"
            check.hashed += 1
            if actual != str(raw["hashes"][algo]).lower():
                return f"{path} has changed bytes (its {algo} is {actual}, {INDEX} records {raw['hashes'][algo]})"
    return None


def check_dataset(root: str | os.PathLike, verify: str = "hash") -> DatasetCheck:
    """Verify the dataset under ``root`` and return its index and decode parameters.

    ``verify``: ``"hash"`` (existence, size, sample count and content hash of every shard),
    ``"size"`` (existence, size and sample count: 4 bytes read per shard) or ``"none"`` (the index
    only). Raises ``DatasetDamaged`` naming every damaged shard (the first few in the message) and
    how to repair it.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify={verify!r}: use one of {', '.join(VERIFY_MODES)}")
    started = time.perf_counter()
    root = Path(root)
    index = load_index(root)
    decode = decode_params(root, index)
    _check_columns(root, index, decode)
    check = DatasetCheck(root, index, decode, verify, shards=len(index["shards"]))
    check.bytes = int(sum(s["raw_data"]["bytes"] for s in index["shards"]))
    if verify != "none":
        _raise_damaged(root, [(shard, _shard_problem(root, shard, verify, check)) for shard in index["shards"]])
        if verify == "hash" and check.hashed < check.shards:
            check.notes.append(
                f"{check.shards - check.hashed} shard(s) record no content hash in {root / INDEX} "
                "(e.g. the published Imagenet.int8): verified their sizes only"
            )
    check.seconds = time.perf_counter() - started
    return check


def check_sample_counts(check: DatasetCheck) -> None:
    """Verify every shard's sample count (as ``check_dataset`` does in modes "size" and "hash") for
    a dataset checked with ``verify="none"``: for a reader that sizes its memory by the index's
    counts. Raises ``DatasetDamaged`` like ``check_dataset``."""
    latent_bytes = math.prod(check.decode.latent_shape)
    root, shards = check.root, check.index["shards"]
    _raise_damaged(root, [(shard, _count_problem(root, shard, latent_bytes)) for shard in shards])


def _raise_damaged(root: Path, found: list[tuple[dict, str | None]]) -> None:
    """``DatasetDamaged`` listing every (shard, problem) with a problem, the first few in the
    message, with the repair of each shard's class; nothing when there is none."""
    problems, repairs = [], []
    for shard, problem in found:
        if problem:
            problems.append(problem)
            repair = _repair(root, shard["raw_data"]["basename"])
            if repair not in repairs:
                repairs.append(repair)
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f" (and {len(problems) - MAX_LISTED} more damaged shard(s))" if len(problems) > MAX_LISTED else ""
        raise DatasetDamaged(f"Dataset damaged: {shown}{more}. To repair: {'; '.join(repairs)}.", problems)
