"""A dataset (or one class version) as Parquet: what ``datasets.load_dataset`` and the Hub viewer read.

Columns, one row per MDS sample in the MDS order::

    vae_output       binary, exactly bytes-per-sample bytes: the uint8 codes, C order (4096 = 4x32x32)
    vae_output_flip  the same for the stored flipped latents (only when the dataset stores them)
    label            int64
    label_as_text    string
    image_id         string: the source image (its path in the source, e.g. "n01440764/x.JPEG"),
                     null when unknown

The codes column is plain ``binary``, not ``fixed_size_binary``: ``datasets`` (5.0.1) cannot load
a ``fixed_size_binary`` column ("does not have a datasets dtype equivalent"); the size per sample
is in the schema metadata and every value has exactly that many bytes. The schema metadata key
``imagenet_int8`` holds JSON: latent shape, range, the decode formula, bytes per sample, the VAE
and the columns. The codes are stored uncompressed (near-random bytes: zstd gains about 1.2x),
the other columns zstd-compressed with dictionaries.

MDS samples carry no image id. The ids are in the class's latents (``latents/<class>/latents.npz``,
in the order the shards were written from): ``image_ids_from_output`` reads them and checks that
those latents quantize to exactly the stored codes, so a class re-encoded since its shards were
written is refused instead of mislabelled. Or pass the ids yourself.

The same input gives byte-identical files (fixed row groups, sorted JSON, no timestamps, same
pyarrow); files are written with ``files.atomic_write_bytes``, a folder of files with
``files.atomic_dir``. No Dagster, no streaming.

``export_parquet`` writes where a user points it, so it never replaces what it did not write: a
destination that is, contains or lies inside the dataset being exported (its folder; for a Hub
snapshot, that repo's whole cache folder) or the ``output`` folder is refused, and so is one that
holds anything but files an earlier export wrote (parquet files with the ``imagenet_int8``
metadata; in a folder, named ``train-XXXXX-of-YYYYY.parquet``). ``write_parquet_file`` is the
unchecked writer for places the product owns (hub_upload's per-class files inside the output).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.dataset.dataset_check import class_of_shard
from imagenet_int8_assets.core.reading.latent_arrays import LatentArrays, load_latents
from imagenet_int8_assets.core.latents.quantize import quantize
from imagenet_int8_assets.core.common.files import atomic_dir, atomic_write_bytes
from imagenet_int8_assets.core.latents.latent_store import read_latents

METADATA_KEY = b"imagenet_int8"
ROW_GROUP_ROWS = 4096  # 16 MiB of 4x32x32 codes per row group
FILE_PATTERN = "train-{index:05d}-of-{count:05d}.parquet"  # the Hub's split naming
FILE_NAME = re.compile(r"train-\d{5}-of-\d{5}\.parquet")  # what FILE_PATTERN writes


def image_ids_from_output(arrays: LatentArrays, output: str | os.PathLike) -> list[str]:
    """The image id of every row of ``arrays`` (loaded from ``<output>/mds`` or one of its class
    versions), from the latents the shards were written from: ``<output>/latents/<class>/``.

    Each class's latents must quantize (with the dataset's range) to exactly its stored codes and
    flipped codes, row for row; else ``ValueError`` (the class was re-encoded since its shards
    were written: rebuild its shards, or pass the ids yourself).
    """
    ids: list[str] = []
    for name, rows in _class_rows(arrays):
        class_ids, latents, _ = read_latents(output, name)
        codes = arrays.codes[rows]
        stored = [("latent", codes)] + ([("latent_flip", arrays.codes_flip[rows])] if arrays.codes_flip is not None else [])
        for key, expected in stored:
            latent = latents.get(key)
            if latent is None or latent.shape != expected.shape or not np.array_equal(quantize(latent, arrays.value_range), expected):
                what = "are missing" if latent is None else (
                    f"have shape {latent.shape}, the shards {expected.shape}" if latent.shape != expected.shape
                    else "do not quantize to the stored codes"
                )
                raise ValueError(
                    f"Class {name!r}: the latents in {Path(output) / 'latents'} ({key}) {what}: they are not the ones its "
                    "shards were written from (re-encoded since?). Re-materialize mds_shards and mds_dataset for it, "
                    "or pass image_ids yourself."
                )
        ids.extend(class_ids)
    if len(ids) != len(arrays):
        raise ValueError(f"{len(ids)} image ids for {len(arrays)} samples: some shards belong to no class folder")
    return ids


def _class_rows(arrays: LatentArrays) -> list[tuple[str, slice]]:
    """(class name, rows) for each run of consecutive shards of one class (from the shard paths)."""
    runs: list[tuple[str, slice]] = []
    for shard in arrays.shards:
        name = class_of_shard(arrays.root, shard.basename)
        if name is None:
            raise ValueError(f"{arrays.root / shard.basename} is in no class folder: the dataset was not built here")
        if runs and runs[-1][0] == name and runs[-1][1].stop == shard.start:
            runs[-1] = (name, slice(runs[-1][1].start, shard.stop))
        else:
            runs.append((name, slice(shard.start, shard.stop)))
    return runs


def parquet_metadata(arrays: LatentArrays) -> dict:
    """What the schema metadata records: how to decode the codes."""
    columns = ["vae_output"] + (["vae_output_flip"] if arrays.codes_flip is not None else [])
    return {
        "latent_shape": list(arrays.latent_shape),
        "value_range": arrays.value_range,
        "dequantize": arrays.formula,
        "bytes_per_sample": arrays.bytes_per_sample,
        "layout": "uint8, C order; np.frombuffer(value, np.uint8).reshape(latent_shape)",
        "code_columns": columns,
        "vae": arrays.vae,
    }


def parquet_bytes(
    arrays: LatentArrays, image_ids: Sequence[str | None] | None = None, rows: slice = slice(None),
    row_group_rows: int = ROW_GROUP_ROWS,
) -> bytes:
    """One Parquet file holding the rows ``rows`` of ``arrays`` (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    start, stop, _ = rows.indices(len(arrays))
    stop = max(start, stop)
    if image_ids is not None and len(image_ids) != len(arrays):
        raise ValueError(f"{len(image_ids)} image ids for {len(arrays)} samples")
    width = arrays.bytes_per_sample
    code_columns = [("vae_output", arrays.codes)] + (
        [("vae_output_flip", arrays.codes_flip)] if arrays.codes_flip is not None else []
    )
    schema = pa.schema(
        [(name, pa.binary()) for name, _ in code_columns]
        + [("label", pa.int64()), ("label_as_text", pa.string()), ("image_id", pa.string())],
        metadata={METADATA_KEY: json.dumps(parquet_metadata(arrays), sort_keys=True).encode("utf-8")},
    )
    known = np.array(sorted(arrays.label_texts), np.int64)
    texts = pa.array([arrays.label_texts[int(k)] for k in known], pa.string())
    sink = pa.BufferOutputStream()
    writer = pq.ParquetWriter(
        sink,
        schema,
        compression={**{name: "NONE" for name, _ in code_columns}, "label": "ZSTD", "label_as_text": "ZSTD", "image_id": "ZSTD"},
        use_dictionary=["label", "label_as_text", "image_id"],
        write_statistics=["label", "label_as_text", "image_id"],
    )
    try:
        for first in range(start, stop, row_group_rows) if stop > start else [start]:
            last = min(first + row_group_rows, stop)
            n = last - first
            offsets = pa.py_buffer(np.arange(n + 1, dtype=np.int32) * np.int32(width))
            columns = [
                pa.Array.from_buffers(pa.binary(), n, [None, offsets, pa.py_buffer(codes.reshape(len(arrays), -1)[first:last])])
                for _, codes in code_columns
            ]
            labels = arrays.labels[first:last]
            if len(known) and not np.isin(labels, known).all():
                raise ValueError("some labels have no text (the dataset has no label_as_text column)")
            label_texts = pc.take(texts, pa.array(np.searchsorted(known, labels))) if len(known) else pa.nulls(n, pa.string())
            ids = pa.array(image_ids[first:last] if image_ids is not None else [None] * n, pa.string())
            writer.write_table(pa.Table.from_arrays([*columns, pa.array(labels), label_texts, ids], schema=schema), row_group_size=row_group_rows)
    finally:
        writer.close()
    return sink.getvalue().to_pybytes()


def export_parquet(
    source: str | os.PathLike | LatentArrays,
    dest: str | os.PathLike,
    *,
    image_ids: Sequence[str | None] | None = None,
    output: str | os.PathLike | None = None,
    rows_per_file: int | None = None,
    verify: str = "size",
    revision: str | None = None,
) -> list[Path]:
    """Export a dataset, or one class version folder, to Parquet; returns the files written.

    ``source``: what ``load_latents`` takes (a folder or a Hub repo id), or loaded ``LatentArrays``.
    Image ids: ``image_ids`` (one per sample, in the dataset's order), or ``output`` (the build's
    output folder: read and checked by ``image_ids_from_output``), else null. With
    ``rows_per_file=None`` one file is written at ``dest``; with a number, ``dest`` becomes a
    folder of ``train-XXXXX-of-YYYYY.parquet`` files of at most that many rows, swapped in whole.

    ``dest`` must be new, an empty folder, or what an earlier export wrote (which is replaced);
    anything else, and any path that is, contains or lies inside the dataset or ``output``
    (symlinks resolved), raises ``ValueError`` before anything is written (see the module docstring).
    """
    if rows_per_file is not None and rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    arrays, image_ids = _arrays_and_ids(source, image_ids, output, verify, revision)
    target = _checked_destination(Path(dest), arrays, output, folder=rows_per_file is not None)
    if rows_per_file is None:
        atomic_write_bytes(target, parquet_bytes(arrays, image_ids))
        return [Path(dest)]
    count = max(1, -(-len(arrays) // rows_per_file))
    names = []
    with atomic_dir(target) as tmp:
        for i in range(count):
            name = FILE_PATTERN.format(index=i, count=count)
            (tmp / name).write_bytes(parquet_bytes(arrays, image_ids, slice(i * rows_per_file, (i + 1) * rows_per_file)))
            names.append(name)
    return [Path(dest) / name for name in names]


def write_parquet_file(
    source: str | os.PathLike | LatentArrays,
    path: str | os.PathLike,
    *,
    image_ids: Sequence[str | None] | None = None,
    output: str | os.PathLike | None = None,
    verify: str = "size",
) -> Path:
    """Write ``source`` (as ``export_parquet`` takes it) as one Parquet file at ``path``, replacing
    whatever file is there, WITHOUT checking the destination.

    Only for a ``path`` the product owns and may overwrite: hub_upload's per-class files under
    ``<output>/hub/parquet/``, which lie inside the output by design. Anything a user points at goes
    through ``export_parquet``, which refuses destinations it could damage.
    """
    arrays, image_ids = _arrays_and_ids(source, image_ids, output, verify, None)
    atomic_write_bytes(path, parquet_bytes(arrays, image_ids))
    return Path(path)


def _arrays_and_ids(
    source: str | os.PathLike | LatentArrays, image_ids: Sequence[str | None] | None,
    output: str | os.PathLike | None, verify: str, revision: str | None,
) -> tuple[LatentArrays, Sequence[str | None] | None]:
    """The loaded dataset and the image id of each row (given, read from ``output``, or None)."""
    if image_ids is not None and output is not None:
        raise ValueError("pass image_ids or output, not both")
    arrays = source if isinstance(source, LatentArrays) else load_latents(source, revision, verify)
    if output is not None:
        image_ids = image_ids_from_output(arrays, output)
    return arrays, image_ids


def _dataset_home(arrays: LatentArrays) -> Path:
    """The folder ``arrays`` was read from, symlinks resolved; for a snapshot in the Hugging Face
    cache (``datasets--<owner>--<name>/snapshots/<commit>``, whose files link into the repo's
    ``blobs/``) the repo's whole cache folder."""
    root = arrays.root.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("datasets--"):
        return root.parent.parent
    return root


def is_export_file(path: Path) -> bool:
    """Whether ``path`` is a regular file that an export wrote: Parquet whose schema metadata has
    the ``imagenet_int8`` key (only the footer is read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.is_symlink() or not path.is_file():
        return False
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError):
        return False
    return METADATA_KEY in metadata


def _checked_destination(dest: Path, arrays: LatentArrays, output: str | os.PathLike | None, folder: bool) -> Path:
    """``dest`` with symlinks resolved (where the export writes), or ``ValueError`` when writing
    there could replace or change anything the export did not write."""
    target = dest.expanduser().resolve()
    refuse = f"export_parquet: refusing to write to {dest}: it"
    protected = [("the output folder", Path(output).expanduser().resolve())] if output is not None else []
    protected.append(("the dataset being exported", _dataset_home(arrays)))
    for what, home in protected:
        relation = (
            "is" if target == home
            else "contains" if home.is_relative_to(target)
            else "lies inside" if target.is_relative_to(home)
            else None
        )
        if relation:
            raise ValueError(
                f"{refuse} {relation} {what} ({home}); an export never writes over or into the data it comes "
                "from: choose a new path outside it."
            )
    if not folder:
        if target.is_dir():
            raise ValueError(
                f"{refuse} is a folder; pass the path of the one file to write, or rows_per_file= to write a "
                "folder of files (choose a new path)."
            )
        if target.exists() and not is_export_file(target):
            raise ValueError(
                f"{refuse} is a file no export wrote (not Parquet with the '{METADATA_KEY.decode()}' metadata), "
                "and the export would replace it: choose a new path (or move that file away)."
            )
        return target
    if target.exists() and not target.is_dir():
        raise ValueError(
            f"{refuse} is a file, and rows_per_file= writes a folder in its place: choose a new path for the folder."
        )
    for entry in sorted(target.iterdir()) if target.is_dir() else []:
        if not (FILE_NAME.fullmatch(entry.name) and is_export_file(entry)):
            raise ValueError(
                f"{refuse} already holds {dest / entry.name}, which no export wrote, and the export replaces the "
                "whole folder: choose a new or empty folder (or move that file away)."
            )
    return target


__all__ = [
    "export_parquet", "image_ids_from_output", "is_export_file", "parquet_bytes", "parquet_metadata",
    "write_parquet_file",
]
