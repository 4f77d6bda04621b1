"""Where everything lives under the output root: one function per artifact.

Layout under the output root (``IMAGENET_INT8_OUTPUT``)::

    manifest/manifest.parquet        raw manifest (one row per source file)
    crops/<class>/images.npy         crop_storage=raw: uint8 (N, S, S, 3) crops, C order, lossless
    crops/<class>/images/<row>.png   crop_storage=png: one lossless PNG per crop
    crops/<class>/meta.json          {"ids", "failed", "recipe", "size", "storage", "sha256", "source", ...}
                                     (crop_storage=none: only this; see ``crop_store``)
    latents/<class>/latents.npz      float32 latent (N, C, h, w), latent_flip, ids; mean, std (latent_storage=full)
    latents/<class>/meta.json        provenance (VAE, weights, device, latent value, seed, ...)
    stats/quantization_stats.json    per-channel statistics, overall and per class
    mds/classes/<class>/<version>/   one immutable build of one class: MDS shards, index.json, build.json
    mds/classes/<class>/current.json the version that the latest mds_shards run of the class wrote
    mds/index.json                   the published dataset: merged index over every class's version
    mds/build.json                   how the published dataset was built (also embedded in index.json)
    report/                          reconstruction report (PNG figures, report.html, metrics.csv)
    probe/                           latent probe (features.npz, figures, report.html)
    .imagenet-int8-build.lock        held by the running `imagenet-int8 build` (see ``build_lock``)

Writes go through ``common.files`` (atomic).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def manifest_path(output: str | os.PathLike) -> Path:
    return Path(output) / "manifest" / "manifest.parquet"


def source_classes_path(output: str | os.PathLike) -> Path:
    """Beside the manifest: the class folders, labels and versions of the last scan (``classes.json``)."""
    return manifest_path(output).with_name("classes.json")


_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ +-]*")
_MAX_NAME = 120


def class_dir_name(class_name: str) -> str:
    """The on-disk folder name for a class: one path component that can never escape its parent
    or collide with the output's own files.

    Plain names (letters, digits, ``. _ + -`` and spaces, starting with a letter or digit, up to
    120 characters, as every ImageNet wnid and CIFAR-10 class) are used unchanged. Any other name
    is percent-encoded (UTF-8 bytes outside ``[A-Za-z0-9._-]`` become ``%XX``; a leading dot too),
    and an encoding longer than 120 characters is cut and completed with a hash of the name. A
    plain name never contains ``%`` and every encoded one does, so two classes never share a folder.
    """
    if not class_name or "\x00" in class_name:
        raise ValueError(f"invalid class name {class_name!r}")
    if _PLAIN_NAME.fullmatch(class_name) and len(class_name) <= _MAX_NAME and not class_name.endswith((" ", ".")):
        return class_name
    raw = class_name.encode("utf-8", "surrogateescape")
    encoded = "".join(
        chr(b) if (chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-" or (chr(b) == "." and i > 0))) else f"%{b:02X}"
        for i, b in enumerate(raw)
    )
    if "%" not in encoded or len(encoded) > _MAX_NAME:
        encoded = f"{encoded[: _MAX_NAME - 20]}%{hashlib.sha256(raw).hexdigest()[:16]}"
    return encoded


def crops_dir(output: str | os.PathLike, class_folder: str) -> Path:
    return Path(output) / "crops" / class_dir_name(class_folder)


def latents_dir(output: str | os.PathLike, class_folder: str) -> Path:
    return Path(output) / "latents" / class_dir_name(class_folder)


def stats_path(output: str | os.PathLike) -> Path:
    return Path(output) / "stats" / "quantization_stats.json"


def report_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "report"


def probe_dir(output: str | os.PathLike) -> Path:
    return Path(output) / "probe"


def mds_root(output: str | os.PathLike) -> Path:
    return Path(output) / "mds"


class MissingArtifact(FileNotFoundError):
    """An upstream partition has not been materialized (or was written by another version)."""


def read_meta(folder: Path, what: str, asset: str) -> dict:
    meta_file = folder / "meta.json"
    if not meta_file.is_file():
        raise MissingArtifact(
            f"No {what} at {str(folder)!r}. Materialize the {asset!r} asset for this partition "
            "first (or run `imagenet-int8 build`)."
        )
    return json.loads(meta_file.read_text(encoding="utf-8"))
