"""A whole Imagenet.int8-style dataset as numpy arrays, read straight from its MDS shards.

``load_latents(source)`` returns ``LatentArrays``: the uint8 codes (N, C, H, W), the integer
labels (N,), one text per label, the stored flipped codes when the dataset has them, and how the
codes decode (shape, range, formula, VAE). ``source`` is a dataset folder (``<output>/mds``, one
class version folder, a download of the published Imagenet.int8) or a Hugging Face Hub dataset
repo id, fetched with ``snapshot_download`` (so the offline cache works).

The shards are parsed with numpy, as ``streaming``'s ``MDSWriter``/``MDSReader`` lay them out::

    shard    = uint32 n | uint32 offsets[n + 1] | config JSON | samples
    sample i = bytes offsets[i] .. offsets[i + 1]:
               uint32 size of each variable-size column (in column order) | each column's bytes

Columns are in the index's ``column_names`` order (the writer sorts them); a column's size is its
``column_sizes`` entry, or the per-sample size for a variable-size one (``str``, the published
``uint8``). Nothing is done per sample in Python: every shard is memory-mapped, the offsets
and sizes are checked as arrays (a shard whose layout contradicts its index raises
``DatasetDamaged``), and the codes are copied into the preallocated output with one strided view
per shard (or one gather over a sliding-window view when the shard's samples differ in size).
Memory is the output (N x bytes per sample; N is the index's counts, checked against the count each
shard file starts with, and its size, before anything is allocated); one shard at a time is
mapped. The labels (the ``str`` column, e.g. "402") are parsed as digit arrays; the text of each
label is decoded once, and every sample's text is checked to equal it.

Needs numpy and ``dataset_check`` (no streaming, torch or Dagster; compressed shards, which this
project never writes, import streaming's decompressor).
"""

from __future__ import annotations

import glob
import json
import math
import mmap
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from imagenet_int8_assets.core.dataset.dataset_check import (
    VERIFY_MODES,
    DatasetDamaged,
    _repair,
    check_dataset,
    check_sample_counts,
    load_index,
    sample_count,
)
from imagenet_int8_assets.core.dataset.mds_index import BUILD_INFO, INDEX, RECORD_KEY, dequantize_formula
from imagenet_int8_assets.core.latents.quantize import dequantize
from imagenet_int8_assets.core.latents.vae import DEFAULT_VAE

LATENT_COLUMN = "vae_output"
FLIP_COLUMN = "vae_output_flip"
LABEL_COLUMN = "label"
TEXT_COLUMN = "label_as_text"
# What a dataset without our build record (the published Imagenet.int8) was encoded with.
PUBLISHED_VAE = {"family": "autoencoder-kl", "requested": DEFAULT_VAE, "repo_id": DEFAULT_VAE}
MAX_LABEL_DIGITS = 18  # fits int64
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ShardRows:
    """Which rows of the arrays one shard filled: ``start`` to ``stop`` (exclusive)."""

    basename: str
    start: int
    stop: int


@dataclass
class LatentArrays:
    """A dataset in memory. ``codes[i]`` is sample i's uint8 latent (C, H, W), ``labels[i]`` its
    label, ``label_texts[labels[i]]`` its text; ``codes_flip`` the stored flipped latents (or
    None). ``latents()`` dequantizes rows with the recorded range (``formula``)."""

    codes: np.ndarray
    labels: np.ndarray
    label_texts: dict[int, str]
    codes_flip: np.ndarray | None
    latent_shape: tuple[int, ...]
    value_range: float
    formula: str
    vae_family: str
    vae_name: str
    vae: dict
    record: dict | None
    root: Path
    source: str
    verified: str
    shards: tuple[ShardRows, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        flip = ", with stored flips" if self.codes_flip is not None else ""
        return (
            f"LatentArrays({len(self)} samples of {self.latent_shape} codes, {len(self.label_texts)} labels{flip}; "
            f"{self.formula}; VAE {self.vae_name} ({self.vae_family}); from {self.source})"
        )

    @property
    def bytes_per_sample(self) -> int:
        return math.prod(self.latent_shape)

    def latents(self, index=slice(None), flip: bool = False) -> np.ndarray:
        """float32 latents of the rows ``index`` (stored flips with ``flip=True``), exactly
        ``quantize.dequantize`` with the recorded range."""
        codes = self.codes if not flip else self.codes_flip
        if codes is None:
            raise ValueError(f"{self.root} stores no flipped latents (no {FLIP_COLUMN!r} column)")
        return dequantize(codes[index], self.value_range)

    def texts(self, index=slice(None)) -> list[str]:
        """The label texts of the rows ``index`` (one Python string per row: for small selections)."""
        return [self.label_texts[int(label)] for label in np.atleast_1d(self.labels[index])]


def load_latents(
    source: str | os.PathLike,
    revision: str | None = None,
    verify: str = "size",
    *,
    flips: bool = True,
    threads: int | None = None,
) -> LatentArrays:
    """Load a whole dataset as numpy arrays (see the module docstring).

    ``source``: a local dataset folder, or a Hugging Face Hub dataset repo id (``owner/name``,
    when no such local path exists): ``index.json``, ``build.json`` and the shards it names are
    fetched with ``snapshot_download`` at ``revision`` (the offline cache works with
    ``HF_HUB_OFFLINE=1``). ``verify`` as in ``open_dataset``: ``"size"`` (default: every shard
    exists with its recorded size), ``"hash"`` (and its content hash) or ``"none"``; damage raises
    ``DatasetDamaged``. Every shard's sample count is checked against the count its file starts
    with (and the file's size) before memory is allocated, also with ``"none"``, so an index that
    disagrees with its shards raises ``DatasetDamaged`` instead of dropping, inventing or
    over-allocating samples. ``flips=False`` skips a stored ``vae_output_flip`` column. ``threads``:
    shards read at once (default: the CPU count).
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"load_latents(verify={verify!r}): use one of {', '.join(VERIFY_MODES)}")
    root, described = resolve_source(source, revision)
    try:
        check = check_dataset(root, verify)
        if verify == "none":  # the arrays are sized by the index's counts: never trust them unchecked
            check_sample_counts(check)
    except DatasetDamaged as exc:
        if described.startswith("Hub"):  # a partial or damaged download, not a build to redo
            raise DatasetDamaged(
                f"{exc} (This is the local snapshot of {described}: download it again, online, without "
                "HF_HUB_OFFLINE.)", exc.problems
            ) from None
        raise
    for note in check.notes:
        warnings.warn(note, stacklevel=2)
    index, decode = check.index, check.decode
    record = _build_record(root, index)
    if record is None:  # the published Imagenet.int8
        vae = dict(PUBLISHED_VAE)
    else:
        vae = dict(record["vae"]) if isinstance(record.get("vae"), dict) else {}
    shape = tuple(int(d) for d in decode.latent_shape)
    columns = _dataset_columns(root, index)
    with_flip = flips and FLIP_COLUMN in columns
    total = int(sum(s["samples"] for s in index["shards"]))
    codes = np.empty((total, *shape), np.uint8)
    codes_flip = np.empty((total, *shape), np.uint8) if with_flip else None
    labels = np.empty(total, np.int64)
    texts: dict[int, str] = {}
    reader = _ShardReader(root, math.prod(shape))
    flat, flat_flip = codes.reshape(total, -1), None if codes_flip is None else codes_flip.reshape(total, -1)
    rows, jobs, start = [], [], 0
    for shard in index["shards"]:
        stop = start + int(shard["samples"])
        rows.append(ShardRows(shard["raw_data"]["basename"], start, stop))
        if stop > start:
            sl = slice(start, stop)
            jobs.append((shard, flat[sl], None if flat_flip is None else flat_flip[sl], labels[sl]))
        start = stop
    # Shards fill disjoint rows; numpy's copies release the GIL, so threads overlap them.
    workers = max(1, min(int(threads or os.cpu_count() or 1), len(jobs)))
    if workers == 1:
        found = [reader.read(*job) for job in jobs]
    else:
        with ThreadPoolExecutor(workers) as pool:
            found = list(pool.map(lambda job: reader.read(*job), jobs))  # raises the first failing shard's error
    for (shard, *_), shard_texts in zip(jobs, found):
        for label, text in shard_texts.items():
            if texts.setdefault(label, text) != text:
                raise ValueError(
                    f"{root / shard['raw_data']['basename']}: label {label} has the text {text!r}, earlier shards "
                    f"{texts[label]!r}; one text per label is expected"
                )
    return LatentArrays(
        codes=codes,
        labels=labels,
        label_texts=dict(sorted(texts.items())),
        codes_flip=codes_flip,
        latent_shape=shape,
        value_range=decode.value_range,
        formula=dequantize_formula(decode.value_range),
        vae_family=str(vae.get("family") or "unknown"),
        vae_name=str(vae.get("requested") or vae.get("repo_id") or "unknown"),
        vae=vae,
        record=record,
        root=root,
        source=described,
        verified=check.verified,
        shards=tuple(rows),
    )


# --------------------------------------------------------------------------------------------
# Where the dataset is


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> tuple[Path, str]:
    """The local folder of ``source`` and a description of it: the folder itself, or the local
    snapshot of a Hub dataset repo (index, build record and the shards the index names)."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists() or not _REPO_ID.fullmatch(text):
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to a Hub repo id; {text!r} is a local path")
        return path, f"local folder {path}"
    return hub_snapshot(text, revision), f"Hub dataset {text}" + (f" at {revision}" if revision else "")


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the offline cache) the files of the dataset repo ``repo_id`` that a
    reader needs: ``index.json`` and ``build.json`` first, then, at the same commit, the shards
    that index names. Returns the snapshot folder."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    from imagenet_int8_assets.core.common.urls import redact_url, redact_urls

    def fetch(rev, patterns):
        try:
            return Path(snapshot_download(repo_id, repo_type="dataset", revision=rev, allow_patterns=patterns))
        except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            hint = (
                "HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it: download it once "
                "online (or unset HF_HUB_OFFLINE)"
                if offline
                else "check the repo id, the revision and your access (HF_TOKEN)"
            )
            # the client's text quotes the URL it called, with the credentials of HF_ENDPOINT if any:
            # shown redacted, and the original is not chained (a traceback would print it)
            raise FileNotFoundError(
                f"No dataset at {repo_id!r}: not a local folder, and the Hugging Face Hub dataset repo "
                f"{repo_id!r}{f' at {rev}' if rev else ''} could not be fetched from {redact_url(constants.ENDPOINT)} "
                f"({type(exc).__name__}: {redact_urls(str(exc).splitlines()[0]) if str(exc) else ''}); {hint}."
            ) from None

    head = fetch(revision, [INDEX, BUILD_INFO])
    commit = head.name  # snapshots/<commit>: the second call reads the same commit
    if not (head / INDEX).is_file():
        raise FileNotFoundError(
            f"The Hugging Face Hub dataset repo {repo_id!r} (commit {commit}) has no {INDEX} at its root: not an "
            "MDS dataset (or not in the local cache, with HF_HUB_OFFLINE set)."
        )
    index = load_index(head)
    names = [INDEX, BUILD_INFO]
    for shard in index["shards"]:
        for key in ("raw_data", "zip_data"):
            if isinstance(shard.get(key), dict):
                names.append(glob.escape(shard[key]["basename"]))
    return fetch(commit, names)


def _build_record(root: Path, index: dict) -> dict | None:
    """The build record: index.json's ``imagenet_int8`` key, else ``build.json`` (``check_dataset``
    has already rejected an unreadable one), else None (the published dataset)."""
    record = index.get(RECORD_KEY)
    if isinstance(record, dict):
        return record
    path = root / BUILD_INFO
    if path.is_file():
        record = json.loads(path.read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else None
    return None


def _dataset_columns(root: Path, index: dict) -> list[str]:
    """The columns every shard holds (the latent and label columns are required)."""
    shards = index["shards"]
    if not shards:
        return [LATENT_COLUMN, LABEL_COLUMN, TEXT_COLUMN]
    names = list(shards[0]["column_names"])
    for shard in shards:
        if list(shard["column_names"]) != names:
            raise DatasetDamaged(
                f"Dataset damaged: {root / INDEX} gives {shard['raw_data']['basename']} the columns "
                f"{shard['column_names']}, the first shard {names}; re-run the merged dataset step "
                "(materialize mds_dataset)."
            )
    for required in (LATENT_COLUMN, LABEL_COLUMN):
        if required not in names:
            raise ValueError(f"{root / INDEX}: the shards have no {required!r} column (columns: {names}); not an Imagenet.int8-style dataset")
    return names


# --------------------------------------------------------------------------------------------
# Reading shards


class _ShardReader:
    """Maps one shard at a time and fills its rows of the output; returns its label texts."""

    def __init__(self, root: Path, latent_bytes: int):
        self.root = root
        self.latent_bytes = latent_bytes

    def _damaged(self, basename: str, what: str) -> DatasetDamaged:
        return DatasetDamaged(
            f"Dataset damaged: {self.root / basename} {what}. To repair: {_repair(self.root, basename)}."
        )

    def _load(self, shard: dict) -> tuple[np.ndarray, str]:
        """The shard's bytes, memory-mapped read-only (unmapped when the array is freed);
        compressed shards are decompressed into memory."""
        raw = shard["raw_data"]
        basename = raw["basename"]
        path = self.root / basename
        packed = shard.get("zip_data")
        if not path.exists() and isinstance(packed, dict) and shard.get("compression"):
            from streaming.base.compression import decompress

            data = decompress(shard["compression"], (self.root / packed["basename"]).read_bytes())
            return np.frombuffer(data, np.uint8), basename
        try:
            fh = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise self._damaged(basename, "is missing") from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size != int(raw["bytes"]) or size == 0:
                raise self._damaged(basename, f"has {size:,} bytes, index.json records {int(raw['bytes']):,}")
            # MAP_POPULATE maps the whole (page-cached) file in one call: far cheaper than read()
            if hasattr(mmap, "MAP_POPULATE"):
                mapped = mmap.mmap(fh.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
            else:
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, np.uint8), basename

    def read(self, shard: dict, out: np.ndarray, out_flip: np.ndarray | None, labels: np.ndarray) -> dict[int, str]:
        data, basename = self._load(shard)
        n = int(shard["samples"])
        table = _SampleTable(data, n, shard["column_sizes"], lambda what: self._damaged(basename, what))
        names, encodings = list(shard["column_names"]), list(shard["column_encodings"])
        for name, target in ((LATENT_COLUMN, out), (FLIP_COLUMN, out_flip)):
            if target is None:
                continue
            j = names.index(name)
            sizes = table.sizes(j)
            wrong = np.flatnonzero(sizes != self.latent_bytes)
            if wrong.size:
                raise self._damaged(
                    basename,
                    f"stores {int(sizes[wrong[0]])} bytes of {name!r} (encoding {encodings[j]!r}) in sample "
                    f"{int(wrong[0])}, where the latent shape needs {self.latent_bytes}",
                )
            table.copy_column(j, self.latent_bytes, target)
        j = names.index(LABEL_COLUMN)
        if encodings[j] != "str":
            raise ValueError(f"{self.root / basename}: the {LABEL_COLUMN!r} column is {encodings[j]!r}; expected 'str' (e.g. \"402\")")
        one_label = self._parse_labels(table, j, labels, basename)
        if TEXT_COLUMN not in names:
            return {}
        return self._texts(table, names.index(TEXT_COLUMN), labels, one_label, basename)

    def _parse_labels(self, table: _SampleTable, j: int, labels: np.ndarray, basename: str) -> bool:
        """Fill ``labels`` from the ``str`` column ``j``; True when the shard holds a single label."""
        sizes = table.sizes(j)
        width = int(sizes.max())
        if int(sizes.min()) < 1 or width > MAX_LABEL_DIGITS:
            i = int(np.argmin(sizes) if int(sizes.min()) < 1 else np.argmax(sizes))
            raise ValueError(f"{self.root / basename}: sample {i} has a {int(sizes[i])}-character label; expected a label index like \"402\"")
        rows = table.column(j, width)
        if table.constant(sizes) and _same_rows(rows):  # the common case: one class per shard
            text = bytes(rows[0])
            if not (text.isascii() and text.isdigit()):
                raise ValueError(f"{self.root / basename}: sample 0 has the label {text.decode('utf-8', 'replace')!r}; expected a label index like \"402\"")
            labels.fill(int(text))
            return True
        digits = rows.astype(np.int64) - ord("0")
        position = np.arange(width)
        inside = position < sizes[:, None]
        bad = np.flatnonzero((inside & ((digits < 0) | (digits > 9))).any(1))
        if bad.size:
            i = int(bad[0])
            text = bytes(rows[i, : int(sizes[i])]).decode("utf-8", "replace")
            raise ValueError(f"{self.root / basename}: sample {i} has the label {text!r}; expected a label index like \"402\"")
        power = np.where(inside, 10 ** np.clip(sizes[:, None] - 1 - position, 0, None), 0)
        labels[:] = (digits * power).sum(1)
        return bool(labels.min() == labels.max())

    def _texts(self, table: _SampleTable, j: int, labels: np.ndarray, one_label: bool, basename: str) -> dict[int, str]:
        """The one text of each label in the shard (every sample's text is checked against it)."""
        sizes = table.sizes(j)
        width = max(int(sizes.max()), 1)
        rows = table.column(j, width)
        if one_label and table.constant(sizes) and _same_rows(rows):
            firsts = {int(labels[0]): 0}
        else:
            rows = np.array(rows)
            rows[np.arange(width) >= sizes[:, None]] = 0
            kinds, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
            differs = np.flatnonzero((sizes != sizes[first][inverse]) | (rows != rows[first][inverse]).any(1))
            if differs.size:
                i = int(differs[0])
                raise ValueError(
                    f"{self.root / basename}: samples with label {int(labels[i])} have different texts (sample {i} "
                    f"differs from sample {int(first[inverse[i]])}); one text per label is expected"
                )
            firsts = dict(zip(kinds.tolist(), first.tolist()))
        texts = {}
        for label, i in firsts.items():
            try:
                texts[label] = bytes(rows[i, : int(sizes[i])]).decode("utf-8")
            except UnicodeDecodeError:
                raise self._damaged(basename, f"has a label text that is not UTF-8 (sample {i})") from None
        return texts


class _SampleTable:
    """Where each column of each sample of one shard lies, checked against the file.

    When every sample has the same length and the same variable-column sizes (a shard of one
    class), each column is an evenly spaced run and is read through one strided view; otherwise
    through per-sample offsets (one gather over a sliding-window view per column).
    """

    def __init__(self, data: np.ndarray, n: int, column_sizes: list, damaged):
        self.data, self.n = data, n
        fixed = [int(s) if s else 0 for s in column_sizes]
        variable = [j for j, s in enumerate(fixed) if not s]
        head = 4 * len(variable)
        if data.size < 4 * (n + 2) or sample_count(data) != n:
            raise damaged(f"does not start with its sample count ({n}, from index.json)")
        offsets = data[4 : 4 * (n + 2)].view("<u4").astype(np.int64)
        first, length = int(offsets[0]), int(offsets[1] - offsets[0])
        if first < 4 * (n + 2) or int(offsets[-1]) != data.size:
            raise damaged("has a sample table that does not fit the file (bad offsets)")
        self.even = int(offsets[-1]) - first == n * length and bool((offsets[1:] - offsets[:-1] == length).all())
        if self.even and length >= head:
            heads = self._strided(first, head, length)
            if _same_rows(heads):  # every sample has the same column sizes
                sizes = np.array(fixed, np.int64)
                sizes[variable] = heads[0].view("<u4") if head else []
                if int(sizes.sum()) + head != length:
                    raise damaged(f"has samples whose column sizes do not add up to their length ({length} bytes)")
                self.step = length
                self.row_sizes = sizes  # (columns,)
                self.begins = first + head + np.cumsum(sizes) - sizes
                return
        self.step = 0
        lengths = np.diff(offsets)
        if (lengths < head).any():
            raise damaged("has a sample shorter than its column sizes")
        starts = offsets[:-1]
        sizes = np.empty((n, len(fixed)), np.int64)
        sizes[:] = fixed
        if variable:
            sizes[:, variable] = _rows(data, starts, head).view("<u4")
        bad = np.flatnonzero(sizes.sum(1) + head != lengths)
        if bad.size:
            i = int(bad[0])
            raise damaged(f"sample {i} has column sizes that do not add up to its length ({int(lengths[i])} bytes)")
        self.row_sizes = sizes  # (n, columns)
        self.begins = starts[:, None] + head + np.cumsum(sizes, 1) - sizes

    def _strided(self, begin: int, width: int, step: int) -> np.ndarray:
        """Rows ``data[begin + i * step : ... + width]``, i < n, as a view (the caller checked bounds)."""
        return as_strided(self.data[begin:], shape=(self.n, width), strides=(step, 1), writeable=False)

    def constant(self, sizes: np.ndarray) -> bool:
        return bool(self.step) or int(sizes.min()) == int(sizes.max())

    def sizes(self, j: int) -> np.ndarray:
        if self.step:
            return np.full(self.n, self.row_sizes[j], np.int64)
        return self.row_sizes[:, j]

    def column(self, j: int, width: int) -> np.ndarray:
        """(n, width) uint8: the first ``width`` bytes of column ``j`` of every sample (a column
        shorter than ``width`` is followed by the sample's next bytes; callers mask by size)."""
        if self.step and width <= self.row_sizes[j]:
            return self._strided(int(self.begins[j]), width, self.step)
        begins = self.begins[:, j] if not self.step else int(self.begins[j]) + self.step * np.arange(self.n)
        return _rows(self.data, begins, width)

    def copy_column(self, j: int, width: int, out: np.ndarray) -> None:
        """``out[i] = column j of sample i`` (the sizes were checked to be ``width``)."""
        if self.step:
            out[...] = self._strided(int(self.begins[j]), width, self.step)
        else:
            np.take(sliding_window_view(self.data, width), self.begins[:, j], axis=0, out=out)


def _same_rows(rows: np.ndarray) -> bool:
    return rows.shape[0] <= 1 or bool((rows == rows[0]).all())


def _rows(data: np.ndarray, begins: np.ndarray, width: int) -> np.ndarray:
    """A new (len(begins), width) uint8 array: ``data[b : b + width]`` for each b (zero past the end)."""
    if data.size < int(begins.max()) + width:
        data = np.concatenate([data, np.zeros(int(begins.max()) + width - data.size, np.uint8)])
    return sliding_window_view(data, width)[begins]


__all__ = ["LatentArrays", "ShardRows", "hub_snapshot", "load_latents", "resolve_source"]
