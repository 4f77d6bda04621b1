"""The reconstruction report's content and files (no Dagster import).

``reconstruction_report`` (the asset) decodes a seeded sample per class and hands the results
here: ``assemble_report`` aggregates the per-image metrics (overall and per class), lays out the
grid (round-robin over classes), draws the figures and builds report.html, report.md,
metrics.csv and summary.json; ``ReconstructionReport.write`` replaces the report folder
atomically. ``quality_problems`` is the blocking check's rule, read from summary.json.

Decoding is the report's cost, so each class's results are cached in ``<report>/cache/`` (one
``ReportCache`` entry per class, keyed by ``class_cache_key``: everything that decides them) and
a rebuild decodes only the classes whose key changed. An entry holds what the report needs from
its class and no more: the metrics rows, the float latents of the sample (the histograms) and
only the first few images the grid can show (``GridPlan``). A report assembled from cached and
fresh entries is byte-identical to one decoded from scratch.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imagenet_int8_assets.core.quality.metrics import summarize
from imagenet_int8_assets.core.common.files import atomic_dir, atomic_write_bytes
from imagenet_int8_assets.core.common.layout import class_dir_name, crops_dir
from imagenet_int8_assets.core.common.tables import markdown_table

SUMMARY = "summary.json"
METRICS = ("psnr_float", "psnr_uint8", "psnr_gap", "ssim_float", "ssim_uint8")
# the per-channel statistics the report (and the dataset card) show: a summary of quantization_stats
REPORT_CHANNEL_COLUMNS = ["channel", "mean", "std", "p0.1", "p99.9", "clip_fraction", "quant_rmse"]


@dataclass
class ClassSamples:
    """One class's decoded sample: one metrics row per image, and the crops and both
    reconstructions of its first images (all of them, or only the ones the grid can show, see
    ``GridPlan``). ``channel_values``: the sample's float latents as (channels, values), for the
    histograms (the report's cache keeps them with the rest)."""

    name: str
    originals: np.ndarray  # uint8 (k, S, S, 3), k <= len(rows)
    from_float: np.ndarray
    from_uint8: np.ndarray
    rows: list[dict]
    channel_values: np.ndarray | None = None

    def keep_first(self, k: int) -> ClassSamples:
        """The same results with the images of only the first ``k`` samples (what the grid can show)."""
        first = [a[:k].copy() for a in (self.originals, self.from_float, self.from_uint8)]  # copies: the rest is freed
        return ClassSamples(self.name, *first, self.rows, self.channel_values)


def aggregate(rows: Sequence[dict]) -> dict:
    """``{"images": n, <metric>: mean over rows}`` for every metric (NaN without rows)."""
    out: dict = {"images": len(rows)}
    for key in METRICS:
        out[key] = summarize([r[key] for r in rows])["mean"] if rows else float("nan")
    return out


def per_class_rows(rows: Sequence[dict]) -> list[dict]:
    """``aggregate`` per class, classes in order of first appearance."""
    by_class: dict[str, list[dict]] = {}
    for row in rows:
        by_class.setdefault(row["class"], []).append(row)
    return [{"class": k, **aggregate(class_rows)} for k, class_rows in by_class.items()]


def metrics_csv(rows: Sequence[dict]) -> bytes:
    """The per-image metrics as CSV (UTF-8), columns in the first row's order; empty without rows."""
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def grid_tiles(samples: Sequence[ClassSamples], per_class: int, max_images: int) -> list[tuple]:
    """Round-robin over classes (every class shows before any repeats), at most ``max_images``:
    ``(original, from_float, from_uint8, psnr_float, psnr_uint8, class)`` per tile.

    A class takes part with each of its images (``rows``); the tiles need the images of only its
    first few, which ``GridPlan`` says (a ValueError when one is missing)."""
    tiles = []
    for n in range(per_class):
        for s in samples:
            if n < len(s.rows) and len(tiles) < max_images:
                if n >= len(s.originals):
                    raise ValueError(f"the grid shows image {n} of class {s.name!r}, whose images were not kept")
                tiles.append(
                    (s.originals[n], s.from_float[n], s.from_uint8[n], s.rows[n]["psnr_float"], s.rows[n]["psnr_uint8"], s.name)
                )
    return tiles


class GridPlan:
    """How many of its first images each class may show in the grid (``grid_tiles``), known as the
    classes come, in report order, before the later ones are known.

    Image ``n`` of the ``j``-th class is a tile when fewer than ``max_images`` tiles come before it:
    the earlier classes' images ``0..n`` and its own ``0..n-1`` (later classes only add tiles
    before it, in earlier rounds). Counting only the classes so far therefore gives an upper bound
    that the whole list can only lower: keeping that many images of each class is enough for the
    grid. It is bounded whatever the class count: at most ``max_images`` per class and none from
    the ``max_images``-th class on (with full classes, about ``max_images * ln(max_images)`` in all).
    """

    def __init__(self, per_class: int, max_images: int):
        self.max_images = max_images
        self.before = [0] * max(per_class, 0)  # per round n: images 0..n of the classes so far

    def needed(self, count: int) -> int:
        """Images of a class with ``count`` samples that the grid may show, were it the next class."""
        shown = 0
        for n in range(min(count, len(self.before))):
            if self.before[n] + n >= self.max_images:
                break
            shown += 1
        return shown

    def add(self, count: int) -> int:
        """``needed(count)``, and the class (``count`` samples) takes its place in the report."""
        shown = self.needed(count)
        for n in range(len(self.before)):
            self.before[n] += min(count, n + 1)
        return shown


@dataclass
class ReconstructionReport:
    rows: list[dict]
    overall: dict
    per_class: list[dict]
    summary: dict
    images: dict[str, bytes]  # name -> PNG
    html: str
    markdown: str
    tables: dict[str, str] = field(default_factory=dict)  # "overall", "per_class", "channels" (markdown)

    def files(self) -> dict[str, bytes]:
        """Every file of the report folder, by name."""
        out = {f"{name}.png": png for name, png in self.images.items()}
        out["report.html"] = self.html.encode("utf-8")
        out["report.md"] = self.markdown.encode("utf-8")
        out["metrics.csv"] = metrics_csv(self.rows)
        out[SUMMARY] = json.dumps(self.summary, indent=2, default=float).encode("utf-8")
        return out

    def size(self) -> int:
        return sum(len(data) for data in self.files().values())

    def write(self, folder: str | os.PathLike, cached: Iterable[str] = ()) -> Path:
        """Replace ``folder`` with the report as a whole (``files.atomic_dir``), moving the
        ``ReportCache`` entries of the classes ``cached`` over with it; every other entry (classes
        no longer in the report, leftovers of killed runs) goes with the old folder."""
        folder = Path(folder)
        with atomic_dir(folder) as tmp:
            for name, data in self.files().items():
                (tmp / name).write_bytes(data)
            ReportCache(folder).move_entries(cached, ReportCache(tmp))
        return folder


def assemble_report(
    samples: Sequence[ClassSamples],
    channel_values: Sequence[np.ndarray],
    stats: dict,
    value_range: float,
    vae_name: str,
    lpips_note: str,
    per_class: int,
    max_grid_images: int,
) -> ReconstructionReport:
    """The whole report from the decoded samples and quantization_stats' record (``stats``).

    ``channel_values``: per class, the float latents as (channels, values). Raises ValueError
    when no class has an image.
    """
    from imagenet_int8_assets.core.quality import report_figures as figures

    rows = [row for s in samples for row in s.rows]
    if not rows:
        raise ValueError("no decoded images to report on")
    overall = aggregate(rows)
    classes = per_class_rows(rows)
    tiles = grid_tiles(samples, per_class, max_grid_images)
    grid_image = figures.reconstruction_grid(
        np.stack([t[0] for t in tiles]), np.stack([t[1] for t in tiles]), np.stack([t[2] for t in tiles]),
        [t[3] for t in tiles], [t[4] for t in tiles], labels=[t[5] for t in tiles],
    )
    grid_png = io.BytesIO()
    grid_image.save(grid_png, format="PNG")
    images = {
        "grid": grid_png.getvalue(),
        "histograms": figures.channel_histograms(list(np.concatenate(channel_values, axis=1)), value_range),
        "quant_rmse": figures.channel_bars(stats["overall"], "quant_rmse", "quantization RMSE per channel"),
        "clip_fraction": figures.channel_bars(stats["overall"], "clip_fraction", f"fraction clipped at +-{value_range:g}"),
    }
    summary = {
        **overall,
        "clip_fraction": stats["clip_fraction"],
        "quant_rmse": stats["quant_rmse"],
        "quant_range": value_range,
        "lpips": lpips_note,
        "vae": vae_name,
        "per_class": classes,
    }
    tables = {
        "overall": markdown_table([overall]),
        "per_class": markdown_table(classes),
        "channels": markdown_table(stats["overall"], REPORT_CHANNEL_COLUMNS),
    }
    notes = [lpips_note, f"VAE: {vae_name}; range +-{value_range:g}."]
    page = figures.html_report(
        "Reconstruction quality",
        [
            ("Overall (mean over images)", figures.html_table([overall], list(overall))),
            ("Per class", figures.html_table(classes, list(classes[0]))),
            ("Latent channels", figures.html_table(stats["overall"], REPORT_CHANNEL_COLUMNS)),
            ("Notes", "".join(f"<p>{html.escape(note)}</p>" for note in notes)),
        ],
        images,
    )
    markdown = "\n\n".join(
        ["# Reconstruction quality", "## Overall", tables["overall"], "## Per class", tables["per_class"],
         "## Latent channels", tables["channels"], lpips_note]
        + [f"![{name}]({name}.png)" for name in images]
    )
    return ReconstructionReport(rows, overall, classes, summary, images, page, markdown, tables)


# --- the per-class cache ----------------------------------------------------------------------------

CACHE_FOLDER = "cache"
# Bump when what an entry holds, or how the report computes it (the sample, the decode, the
# metrics), changes: entries of another format are then recomputed instead of trusted.
CACHE_FORMAT = 1
IMAGE_ARRAYS = ("originals", "from_float", "from_uint8")


def file_identity(path: str | os.PathLike) -> list[int] | None:
    """``[size, mtime_ns, ctime_ns, inode]`` of a file, None when it cannot be read: any rewrite
    (every writer here replaces files by a rename, which is a new inode) or in-place edit changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [int(st.st_size), int(st.st_mtime_ns), int(st.st_ctime_ns), int(st.st_ino)]


def crop_inputs(output: str | os.PathLike, name: str, pick: Sequence[int]) -> dict | None:
    """What decides the crops ``pick`` of class ``name`` read back (the report's originals): the
    crops' record (its file, recipe, size, storage and the picks' recorded pixel hashes) and the
    files the picks are read from as they are now (the source files for ``none`` crops, which a
    from-scratch report recomputes and verifies; the PNGs; images.npy). None without a record."""
    from imagenet_int8_assets.core.crops import crop_store

    folder = crops_dir(output, name)
    try:
        meta = json.loads((folder / crop_store.META_FILE).read_text(encoding="utf-8"))
        ids, hashes = meta["ids"], meta.get(crop_store.PIXEL_HASH)
        rows = [int(r) for r in pick]
        storage = meta.get("storage", "raw")
        if storage == "none":
            root = crop_store.source_root_of(Path(output), meta, None)
            files = [None if root is None else root / ids[r] for r in rows]
        elif storage == "png":
            files = [folder / crop_store.PNG_FOLDER / crop_store.png_name(r) for r in rows]
        else:
            files = [folder / crop_store.RAW_FILE]
        return {
            "record": file_identity(folder / crop_store.META_FILE),
            "recipe": meta.get("recipe"),
            "size": meta.get("size"),
            "max_pixels": meta.get("max_pixels"),
            "storage": storage,
            "sha256": None if hashes is None else [hashes[r] for r in rows],
            "files": [None if f is None else file_identity(f) for f in files],
        }
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None  # no (readable) record: decoding the class says what is wrong


def class_cache_key(
    output: str | os.PathLike,
    name: str,
    pick: Sequence[int],
    *,
    version: str,
    vae: dict,
    value_range: float,
    seed: int,
    per_class: int,
    device_type: str,
    torch_version: str,
) -> dict:
    """Everything that decides one class's report results, as JSON: the class's published MDS
    version (its uint8 codes), its latents file (the float latents and ids), its crops
    (``crop_inputs``), the VAE as the dataset records it (name, revision, weights sha256, ...),
    the value range, the seed and ``per_class`` (the sample), the decode device type and torch
    version (the decoded pixels), and ``CACHE_FORMAT``."""
    from imagenet_int8_assets.core.common.layout import latents_dir

    return {
        "format": CACHE_FORMAT,
        "class": name,
        "version": version,
        "latents": file_identity(latents_dir(output, name) / "latents.npz"),
        "crops": crop_inputs(output, name, pick),
        "vae": vae,
        "quant_range": float(value_range),
        "seed": int(seed),
        "per_class": int(per_class),
        "device_type": device_type,
        "torch": torch_version,
    }


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True)


class ReportCache:
    """One entry per class under ``<report folder>/cache/``: ``<class folder name>.npz`` with the
    class's ``class_cache_key`` and results (metrics rows, channel values, the images of its first
    samples). Written atomically (``files.atomic_write_bytes``); an entry that cannot be read,
    holds another key (another output, changed inputs, another format) or looks wrong in any way
    is ignored, so the class is decoded again: an entry is never trusted blindly."""

    def __init__(self, report_folder: str | os.PathLike):
        self.folder = Path(report_folder) / CACHE_FOLDER

    def path(self, name: str) -> Path:
        return self.folder / f"{class_dir_name(name)}.npz"

    def load(self, key: dict, count: int, shown: int) -> ClassSamples | None:
        """The cached results of ``key["class"]`` when its entry holds exactly ``key``, ``count``
        rows and the images of at least its first ``shown`` samples; else None."""
        name = key["class"]
        try:
            with np.load(self.path(name), allow_pickle=False) as data:
                if str(data["key"][()]) != _canonical(key):
                    return None
                rows = json.loads(str(data["rows"][()]))
                images = [np.asarray(data[k]) for k in IMAGE_ARRAYS]
                channel_values = np.asarray(data["channel_values"])
            columns = ["class", "id", *METRICS]
            kept = images[0].shape[0]
            valid = (
                isinstance(rows, list)
                and len(rows) == count
                and all(isinstance(r, dict) and list(r) == columns and r["class"] == name for r in rows)
                and all(isinstance(r["id"], str) and all(isinstance(r[m], (int, float)) for m in METRICS) for r in rows)
                and all(a.dtype == np.uint8 and a.ndim == 4 and a.shape == images[0].shape for a in images)
                and images[0].shape[-1] == 3
                and shown <= kept <= count
                and channel_values.dtype == np.float32
                and channel_values.ndim == 2
                and (count == 0 or channel_values.shape[1] % count == 0)
            )
        except Exception:  # noqa: BLE001 - a damaged or foreign file of any kind: decode the class again
            return None
        if not valid:
            return None
        return ClassSamples(name, *images, rows, channel_values)

    def save(self, key: dict, samples: ClassSamples) -> None:
        """Store ``samples`` (with the images it keeps) as the entry of ``key["class"]``."""
        if samples.name != key["class"] or samples.channel_values is None:
            raise ValueError(
                f"the entry of class {key['class']!r} holds that class's results with their channel values, "
                f"not those of {samples.name!r}"
            )
        buffer = io.BytesIO()
        np.savez(
            buffer,
            key=np.array(_canonical(key)),
            rows=np.array(json.dumps(samples.rows)),
            channel_values=np.ascontiguousarray(samples.channel_values, dtype=np.float32),
            **{k: np.ascontiguousarray(getattr(samples, k), dtype=np.uint8) for k in IMAGE_ARRAYS},
        )
        atomic_write_bytes(self.path(key["class"]), buffer.getvalue())

    def move_entries(self, names: Iterable[str], other: ReportCache) -> int:
        """Move the entries of ``names`` into ``other`` (renames, same file system); returns how many."""
        moved = 0
        for name in names:
            source = self.path(name)
            if source.is_file():
                other.folder.mkdir(parents=True, exist_ok=True)
                os.replace(source, other.path(name))
                moved += 1
        return moved


def read_summary(folder: str | os.PathLike) -> dict:
    return json.loads((Path(folder) / SUMMARY).read_text(encoding="utf-8"))


def quality_problems(summary: dict, max_psnr_gap: float, max_clip_fraction: float) -> list[str]:
    """What exceeds the thresholds (empty: within them), one sentence each, naming the setting
    that holds the limit and, for clipping, where a range that clips less is recommended."""
    problems = []
    if summary["psnr_gap"] > max_psnr_gap:
        problems.append(
            f"uint8 latents lose {summary['psnr_gap']:.2f} dB PSNR against float (limit {max_psnr_gap:g}, "
            "IMAGENET_INT8_REPORT_MAX_PSNR_GAP)"
        )
    if summary["clip_fraction"] > max_clip_fraction:
        problems.append(
            f"{summary['clip_fraction']:.2%} of latent values are clipped at +-{summary['quant_range']:g} "
            f"(limit {max_clip_fraction:.2%}, IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION); see quantization_stats' "
            "recommended range (its recommended_range metadata) for an IMAGENET_INT8_QUANT_RANGE that clips less"
        )
    return problems
