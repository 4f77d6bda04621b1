"""The report stage: for a seeded sample of each published class, the crops decoded from the float
latents and from the uint8 codes read back from the dataset, compared and written as the report
under ``<output>/report/`` (``reconstruction_report.assemble_report``).

``report_reconstructions`` is what the ``reconstruction_report`` asset and the benchmark's reference
build call. A class whose inputs did not change since the last report comes from the report's
cache (``ReportCache``) without decoding; a class that cannot be compared (not published yet,
rebuilt since the dataset was published, its folder vanished with its crops not stored) is left
out with the reason and what brings it in (``ReportResult.skipped``). No Dagster: it raises
``MissingArtifact`` (no published dataset, nothing to report on), ``DatasetRepublished`` and
``CropVerificationError`` (a stored crop no longer matches its source), which the asset turns into
failures.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.common.layout import MissingArtifact, mds_root, report_dir, stats_path
from imagenet_int8_assets.core.crops.crop_store import CropVerificationError, read_crops
from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.latents.latent_store import read_latents
from imagenet_int8_assets.core.latents.quantize import recorded_range
from imagenet_int8_assets.core.quality.metrics import lpips_available
from imagenet_int8_assets.core.quality.reconstruct import choose_samples, decode_images, reconstruction_rows
from imagenet_int8_assets.core.quality.reconstruction_report import (
    ClassSamples,
    GridPlan,
    ReconstructionReport,
    ReportCache,
    assemble_report,
    class_cache_key,
)


def _ignore(*_args) -> None:
    return None


class DatasetRepublished(Exception):
    """The published dataset changed while the report read it: materializing the report again helps."""


@dataclass(frozen=True)
class ReportConfig:
    """The settings the report reads (``ImagenetInt8Settings``: ``output_path``, ``report_per_class``,
    ``report_grid_images``, ``seed``); ``device``: the resolved device the VAE decodes on."""

    output: Path
    per_class: int = 1
    grid_images: int = 8
    seed: int = 0
    device: str = "cpu"


@dataclass
class ReportResult:
    """What the stage wrote: the ``report`` (its ``overall`` numbers, ``tables`` and ``images``) under
    ``folder``, whether LPIPS was computed (``lpips_note`` says why not), the classes decoded and
    those reused from the cache, and the classes left out with why (``skipped``)."""

    folder: Path
    report: ReconstructionReport
    lpips_ok: bool
    lpips_note: str
    decoded: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def report_reconstructions(
    config: ReportConfig,
    keys: Sequence[str],
    vanished: Sequence[str] = (),
    *,
    space: Callable[[int], object] | None = None,
    info: Callable[[str], None] = _ignore,
    warning: Callable[[str], None] = _ignore,
    progress: Callable[[int], None] = _ignore,
) -> ReportResult:
    """Report on ``keys`` (the dataset's classes; ``vanished``: those gone from the source).

    ``progress(done)`` sees the classes done; ``space(nbytes)`` returns the disk-space guard of the
    report's write (``guard()``, as ``SpaceNeeds`` after ``writing``).
    """
    output = Path(config.output)
    root = mds_root(output)
    build = mds_index.published_record(root)
    if build is None:
        raise MissingArtifact(f"No published dataset at {root}: materialize 'mds_dataset' first.")
    value_range = recorded_range(build)
    decoder = _Decoder(root, build, config.device)
    published = build["per_class"]
    folder = report_dir(output)
    cache = ReportCache(folder)
    plan = GridPlan(config.per_class, config.grid_images)
    key_inputs = {
        "vae": build["vae"], "value_range": value_range, "seed": config.seed, "per_class": config.per_class,
        "device_type": config.device.partition(":")[0], "torch_version": importlib.metadata.version("torch"),
    }
    vanished = set(vanished)

    samples, skipped, reused, decoded, writable = [], {}, [], [], True
    for done, key in enumerate(keys, 1):
        progress(done - 1)
        if key not in published:  # not published yet (automation may run the report on a new stats
            # materialization before mds_dataset publishes the class)
            skipped[key] = f"not in the published dataset yet: {_advice(root, key)}"
            continue
        count = published[key]
        pick = choose_samples(count, config.per_class, config.seed, key)
        key_of_class = class_cache_key(output, key, pick, version=build["versions"][key], **key_inputs)
        if count:
            entry = cache.load(key_of_class, len(pick), plan.needed(len(pick)))
            if entry is not None:
                plan.add(len(pick))
                samples.append(entry)
                reused.append(key)
                continue
        result = _decode_class(config, decoder, key, count, key in vanished, build["versions"][key])
        if isinstance(result, str):
            skipped[key] = result
            continue
        if result is None:  # a class without images
            continue
        result = result.keep_first(plan.add(len(result.rows)))
        writable = writable and _cached(warning, cache, key_of_class, result)
        samples.append(result)
        decoded.append(key)
    progress(len(keys))
    decoder.close()
    _log_skipped(info, skipped)
    if not any(s.rows for s in samples):
        if skipped:
            key, reason = next(iter(skipped.items()))
            raise MissingArtifact(f"Nothing to report on: {len(skipped)} class(es) left out, e.g. {key}: {reason}.")
        raise MissingArtifact("The dataset has no images to report on.")

    stats = json.loads(stats_path(output).read_text(encoding="utf-8"))
    lpips_ok, lpips_note = lpips_available()
    report = assemble_report(
        samples, [s.channel_values for s in samples], stats, value_range, build["vae"]["requested"], lpips_note,
        per_class=config.per_class, max_grid_images=config.grid_images,
    )
    with space(report.size()).guard() if space is not None else nullcontext():
        report.write(folder, cached=[s.name for s in samples])
    info(f"{len(decoded)} class(es) decoded, {len(reused)} reused from the report's cache ({cache.folder})")
    return ReportResult(folder, report, lpips_ok, lpips_note, decoded, reused, skipped)


class _Decoder:
    """The VAE that built the dataset and the published dataset, opened when the first class is
    decoded: a report whose classes all come from the cache loads neither."""

    def __init__(self, root, build: dict, device: str):
        self.root, self.build, self.device = root, build, device
        self.vae = self.dataset = self.offsets = None

    def open(self) -> None:
        from imagenet_int8_assets.core.latents.vae import load_vae_as_recorded
        from imagenet_int8_assets.reader import open_dataset

        if self.vae is not None:
            return
        published = self.build["per_class"]  # the published index lists its classes in this order
        dataset = open_dataset(self.root)
        if int(dataset.num_samples) != sum(published.values()):
            raise DatasetRepublished(
                f"The dataset at {self.root} was republished while the report opened it ({dataset.num_samples} "
                f"samples in its index, {sum(published.values())} in build.json): materialize "
                "reconstruction_report again."
            )
        self.dataset = dataset
        self.offsets = dict(zip(published, np.cumsum([0, *published.values()])[:-1].tolist()))
        self.vae = load_vae_as_recorded(self.build["vae"]).to(self.device)

    def codes(self, key: str, pick) -> np.ndarray:
        """The uint8 codes of samples ``pick`` of class ``key`` as the dataset reads them back (dequantized)."""
        return np.stack([self.dataset[self.offsets[key] + int(i)]["latent"] for i in pick])

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return decode_images(self.vae, latents, self.device)

    def close(self) -> None:
        self.dataset = None


def _decode_class(config: ReportConfig, decoder: _Decoder, key: str, count: int, vanished: bool, published_version: str):
    """Class ``key``'s results (``ClassSamples`` with every image), or why it is left out of the
    report (a str), or None for a class without images. A crop that no longer matches its source
    raises ``CropVerificationError`` (unless its class folder vanished: then it is left out)."""
    root = mds_root(config.output)
    ids, arrays, _ = read_latents(config.output, key)
    if len(ids) != count:
        return (
            f"its latents ({len(ids)}) differ from its {count} published samples (rebuilt since the dataset was "
            f"published): {_advice(root, key, len(ids))}"
        )
    if _current_version(root, key) != published_version:
        # re-made since the dataset was published with as many images: its latents are not the ones
        # the published codes were quantized from, so no comparison would mean anything
        return f"rebuilt since the dataset was published: {_advice(root, key)}"
    if not ids:
        return None
    pick = choose_samples(len(ids), config.per_class, config.seed, key)
    _, crops = read_crops(config.output, key, mmap=True)
    try:  # crops kept as 'none' (or 'png') are recomputed (decoded) and verified here
        originals = np.asarray(crops[pick])
    except CropVerificationError as exc:
        if vanished and exc.source_missing:
            # a class whose folder vanished stays in the dataset, but crops kept as 'none' cannot be
            # recomputed without its files: report on the other classes
            return (
                "its class folder vanished from the source and its crops were not stored (IMAGENET_INT8_CROP_STORAGE="
                "none): put the folder back to report on it, or delete its partition to drop the class"
            )
        raise
    decoder.open()
    z_float = arrays["latent"][pick]
    from_float = decoder.decode(z_float)
    from_uint8 = decoder.decode(decoder.codes(key, pick))
    rows = [
        {"class": key, "id": ids[int(i)], **metrics}
        for i, metrics in zip(pick, reconstruction_rows(originals, from_float, from_uint8))
    ]
    channel_values = np.moveaxis(z_float, 1, 0).reshape(z_float.shape[1], -1)
    return ClassSamples(key, originals, from_float, from_uint8, rows, channel_values)


def _current_version(root: str | os.PathLike, key: str) -> str | None:
    """The class's current MDS version as the published record names versions, or None."""
    try:
        return mds_index.current_version_dir(root, key).relative_to(root).as_posix()
    except FileNotFoundError:
        return None


def _advice(root, key: str, latents: int | None = None) -> str:
    """What brings class ``key`` into the report: its current MDS version published by mds_dataset,
    after its partition is built (it has no current version) or its shards rebuilt (the current
    version does not hold its ``latents`` yet). `imagenet-int8 build` does whichever is needed."""
    try:
        built = mds_index.index_sample_count(mds_index.read_index(mds_index.current_version_dir(root, key)))
    except (OSError, ValueError, KeyError):
        built = None
    if built is None:
        steps = f"preprocessed_crops, vae_latents and mds_shards for class {key!r}, then mds_dataset"
    elif latents is not None and built != latents:
        steps = f"mds_shards for class {key!r}, then mds_dataset"
    else:
        steps = "mds_dataset"
    return f"run `imagenet-int8 build`, or materialize {steps}, then reconstruction_report"


def _cached(warning: Callable[[str], None], cache: ReportCache, key: dict, samples: ClassSamples) -> bool:
    """Store a decoded class in the report's cache (False when it cannot be written: a full or
    read-only disk costs only the decode next time, so the report goes on and stops trying)."""
    try:
        cache.save(key, samples)
        return True
    except OSError as exc:
        warning(
            f"Could not write the report's cache ({exc}): this report stops caching and the next one decodes those "
            f"classes again. Make {cache.folder} writable (free space on its disk)."
        )
        return False


def _log_skipped(info: Callable[[str], None], skipped: dict[str, str], limit: int = 20) -> None:
    """The classes left out of the report, at INFO: the reasons are ordinary (not yet published,
    rebuilt since), each says what brings the class in, and the result lists every one."""
    for key, reason in list(skipped.items())[:limit]:
        info(f"{key}: not in the report: {reason}")
    if len(skipped) > limit:
        info(f"... and {len(skipped) - limit} more class(es) not in the report (metadata: skipped_classes)")
