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
pyarrow); files are written with ``storage.atomic_write_bytes``, a folder of files with
``storage.atomic_dir``. No Dagster, no streaming.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.dataset_check import class_of_shard
from imagenet_int8_assets.core.latent_arrays import LatentArrays, load_latents
from imagenet_int8_assets.core.quantize import quantize
from imagenet_int8_assets.core.storage import atomic_dir, atomic_write_bytes, read_latents

METADATA_KEY = b"imagenet_int8"
ROW_GROUP_ROWS = 4096  # 16 MiB of 4x32x32 codes per row group
FILE_PATTERN = "train-{index:05d}-of-{count:05d}.parquet"  # the Hub's split naming


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
    """
    arrays = source if isinstance(source, LatentArrays) else load_latents(source, revision, verify)
    if image_ids is not None and output is not None:
        raise ValueError("pass image_ids or output, not both")
    if output is not None:
        image_ids = image_ids_from_output(arrays, output)
    dest = Path(dest)
    if rows_per_file is None:
        atomic_write_bytes(dest, parquet_bytes(arrays, image_ids))
        return [dest]
    if rows_per_file < 1:
        raise ValueError(f"rows_per_file must be at least 1, got {rows_per_file}")
    count = max(1, -(-len(arrays) // rows_per_file))
    names = []
    with atomic_dir(dest) as tmp:
        for i in range(count):
            name = FILE_PATTERN.format(index=i, count=count)
            (tmp / name).write_bytes(parquet_bytes(arrays, image_ids, slice(i * rows_per_file, (i + 1) * rows_per_file)))
            names.append(name)
    return [dest / name for name in names]


__all__ = ["export_parquet", "image_ids_from_output", "parquet_bytes", "parquet_metadata"]
