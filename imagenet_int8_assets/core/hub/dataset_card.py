"""The Hub dataset card (README.md), written from what the build recorded (no Dagster import).

``card_inputs(output)`` reads a built output folder: the dataset's build record (``mds/index.json``,
else ``mds/build.json``), each published class version's label, the quantization statistics, the
reconstruction report's summary and figures, and the manifest's bad and skipped files. Only the
build record is required; for every other input that is missing or unreadable the card says so.
``render_card`` turns the inputs into README.md text (YAML metadata, then markdown); it is
deterministic (no timestamps, sorted tables), so the same inputs give the same bytes.
``validate_card`` checks a card offline with huggingface_hub's own card classes and the Hub's lists
of licenses, size categories and tasks. ``random_weights_warning`` is the text that says why a
build must not be published as a real dataset (random or fallback VAE weights).

The card assumes the repository layout of the publish step: the MDS dataset at the root
(``index.json``, ``build.json``, ``classes/...``), the report under ``report/``, the statistics
under ``stats/`` and, when exported, one parquet file per class under ``data/``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.latents.quantize import recorded_range, step
from imagenet_int8_assets.core.quality.reconstruction_report import REPORT_CHANNEL_COLUMNS, SUMMARY
from imagenet_int8_assets.core.hub.hub_upload import PARQUET_FOLDER
from imagenet_int8_assets.core.common.layout import (
    manifest_path,
    mds_root,
    report_dir,
    source_classes_path,
    stats_path,
)
from imagenet_int8_assets.core.common.tables import markdown_table

# The default ``license`` setting: the card says the data is under ImageNet's terms of access
# (the latents are derived from ImageNet images, whose terms allow non-commercial research and
# educational use only). The Hub has no identifier for those terms, hence ``license: other``.
IMAGENET_TERMS = "imagenet-terms"
IMAGENET_LICENSE_NAME = "imagenet-terms-of-access"
IMAGENET_LICENSE_LINK = "https://image-net.org/download.php"
PUBLISHED_DATASET = "cloneofsimo/imagenet.int8"
PARQUET_FILES = f"{PARQUET_FOLDER}/*.parquet"  # the parquet export: one file per class under data/
REPORT_FIGURES = {
    "grid.png": "Original | decoded from the float latent | decoded from the uint8 code",
    "histograms.png": "Latent values per channel, with the clip bounds",
    "quant_rmse.png": "Quantization RMSE per channel",
    "clip_fraction.png": "Fraction of values clipped per channel",
}

# The Hub's license identifiers (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = frozenset(
    """apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0
    bigcode-openrail-m afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear
    c-uda cc cc0-1.0 cc-by-2.0 cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0
    cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0
    cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 cdla-permissive-1.0 cdla-permissive-2.0 wtfpl
    ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 gfdl gpl gpl-2.0 gpl-3.0 lgpl
    lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 postgresql ofl-1.1
    ncsa unlicense zlib pddl lgpl-lr deepfloyd-if-license llama2 llama3 llama3.1 llama3.2 llama3.3
    gemma unknown other""".split()
)
# The Hub's size categories (the same list as datasets' utils/resources/size_categories.json).
HUB_SIZE_CATEGORIES = (
    "unknown", "n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M",
    "100M<n<1B", "1B<n<10B", "10B<n<100B", "100B<n<1T", "n>1T",
)
# The Hub's task categories (the pipeline types of huggingface.js packages/tasks/src/pipelines.ts).
HUB_TASK_CATEGORIES = frozenset(
    """biology text-classification token-classification table-question-answering question-answering
    zero-shot-classification translation summarization feature-extraction text-generation
    text2text-generation fill-mask sentence-similarity text-to-speech text-to-audio
    automatic-speech-recognition audio-to-audio audio-classification audio-text-to-text
    voice-activity-detection depth-estimation image-classification object-detection
    image-segmentation text-to-image image-to-text image-to-image image-to-video
    unconditional-image-generation video-classification reinforcement-learning robotics
    tabular-classification tabular-regression tabular-to-text table-to-text multiple-choice
    text-ranking text-retrieval time-series-forecasting text-to-video image-text-to-text
    visual-question-answering document-question-answering zero-shot-image-classification graph-ml
    mask-generation zero-shot-object-detection text-to-3d image-to-3d image-feature-extraction
    video-text-to-text keypoint-detection visual-document-retrieval any-to-any other""".split()
)
TASK_CATEGORIES = ["image-classification", "unconditional-image-generation", "text-to-image"]
_LICENSE_NAME = re.compile(r"[a-z0-9][a-z0-9.-]*")  # the Hub's license_name: a lowercase slug
_SPLIT = re.compile(r"\w+(\.\w+)*")  # datasets' split names
_CROP_RECIPES = {
    "imagenet.int8": (
        "the published Imagenet.int8 pipeline, pixel for pixel: BICUBIC resize of the full-resolution "
        "image so the short side is {s}, centre crop with the float box PIL rounds, then RGB"
    ),
    "adm": (
        "the ADM centre crop (guided-diffusion, DiT, SiT, EDM2): BOX halving while the short side is "
        "at least {s2}, BICUBIC resize so the short side is {s}, integer centre crop"
    ),
}


@dataclass(frozen=True)
class CardInputs:
    """What the card is written from (``card_inputs`` reads it from an output folder)."""

    record: dict  # the dataset's build record (mds/index.json "imagenet_int8", or mds/build.json)
    labels: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # class -> (label, label_as_text)
    stats: dict | None = None  # stats/quantization_stats.json
    summary: dict | None = None  # report/summary.json
    figures: tuple[str, ...] = ()  # report figures present (file names under report/)
    manifest: dict | None = None  # ``manifest_summary`` of manifest/manifest.parquet
    missing: dict[str, str] = field(default_factory=dict)  # input -> why the card lacks it


# --------------------------------------------------------------------------------------------
# Reading the output


def card_inputs(output: str | Path) -> CardInputs:
    """Read the card's inputs from a built output folder.

    Raises FileNotFoundError when there is no published dataset (no build record); every other
    input may be missing or unreadable, which ``missing`` records and the card shows.
    """
    output = Path(output)
    root = mds_root(output)
    record = _published_record(root)
    missing: dict[str, str] = {}
    stats = _read_json(stats_path(output), "stats", "quantization_stats", missing)
    summary = _read_json(report_dir(output) / SUMMARY, "report", "reconstruction_report", missing)
    figures = tuple(name for name in REPORT_FIGURES if (report_dir(output) / name).is_file())
    manifest = None
    path = manifest_path(output)
    if not path.is_file():
        missing["manifest"] = f"{path.relative_to(output).as_posix()} is missing (materialize raw_manifest)"
    else:
        try:
            import pandas as pd

            manifest = manifest_summary(pd.read_parquet(path, columns=["id", "class_folder", "status", "reason"]))
        except Exception as exc:  # a damaged file: the card says so instead of failing
            missing["manifest"] = f"{path.relative_to(output).as_posix()} cannot be read ({exc})"
    labels = _class_labels(root, record, source_classes_path(output))
    return CardInputs(record, labels, stats, summary, figures, manifest, missing)


def _published_record(root: Path) -> dict:
    try:
        record = mds_index.published_record(root)
        if record is None and (root / mds_index.BUILD_INFO).is_file():
            record = mds_index.read_build_info(root)
    except ValueError as exc:
        raise FileNotFoundError(f"The dataset record under {root} cannot be read ({exc}): re-run mds_dataset") from exc
    if not record:
        raise FileNotFoundError(
            f"No published dataset at {root} (no index.json with a build record, no build.json): "
            "materialize mds_dataset first"
        )
    return record


def _read_json(path: Path, what: str, asset: str, missing: dict[str, str]) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        missing[what] = f"{path.parent.name}/{path.name} is missing (materialize {asset})"
    except (OSError, ValueError) as exc:
        missing[what] = f"{path.parent.name}/{path.name} cannot be read ({exc}); re-materialize {asset}"
    return None


def _class_labels(root: Path, record: dict, classes_file: Path) -> dict[str, tuple[Any, Any]]:
    """Each published class's label and text, from its version's build.json (what the shards hold),
    else from the last scan's classes.json."""
    scanned: dict = {}
    try:
        scanned = json.loads(classes_file.read_text(encoding="utf-8")).get("labels", {})
    except (OSError, ValueError):
        pass
    labels = {}
    for name in record.get("per_class", {}):
        version = record.get("versions", {}).get(name)
        try:
            info = mds_index.read_build_info(root / version)
            labels[name] = (info.get("label"), info.get("label_as_text"))
        except (OSError, ValueError, TypeError):
            label = scanned.get(name)
            labels[name] = tuple(label) if isinstance(label, list) and len(label) == 2 else (None, None)
    return labels


def manifest_summary(frame) -> dict:
    """Counts per status, and the bad and skipped files grouped by the kind of reason.

    ``frame`` has the manifest's ``id``, ``status`` and ``reason`` columns. A reason's kind is its
    text up to the first ``:``, ``(`` or ``;`` (file names and numbers mostly come after those).
    """
    status = Counter(str(s) for s in frame["status"])
    groups: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for row in frame[frame["status"] != "ok"].itertuples(index=False):
        reason = str(row.reason or "")
        kind = re.split(r"[:(;]", reason, maxsplit=1)[0].strip() or "(no reason recorded)"
        groups.setdefault((str(row.status), kind), []).append((str(row.id), reason))
    reasons = [
        {"status": key[0], "reason": key[1], "files": len(rows), "example": min(rows)[0], "example_reason": min(rows)[1]}
        for key, rows in groups.items()
    ]
    reasons.sort(key=lambda r: (-r["files"], r["status"], r["reason"]))
    return {
        "files": int(len(frame)),
        "ok": status.get("ok", 0),
        "bad": status.get("bad", 0),
        "skipped": status.get("skipped", 0),
        "reasons": reasons,
    }


# --------------------------------------------------------------------------------------------
# Rendering


def size_category(samples: int) -> str:
    """The Hub's size category for ``samples`` examples (``n<1K``, ``1K<n<10K``, ...)."""
    bounds = [(10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
              (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
              (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]
    for bound, name in bounds:
        if samples < bound:
            return name
    return "n>1T"


def random_weights_warning(record: dict) -> str | None:
    """Why this build must not pass for a real dataset, or None.

    Non-None when the VAE had random weights (``vae.source == "random"``: a test or offline preset)
    or when the requested VAE could not be loaded and a fallback encoded instead
    (``vae.fallback_reason``). The publish step refuses such builds unless forced.
    """
    vae = record.get("vae") or {}
    random_weights = vae.get("source") == "random"
    fallback = vae.get("fallback_reason")
    if not random_weights and not fallback:
        return None
    requested = vae.get("requested") or "?"
    loaded = (vae.get("extra") or {}).get("loaded_preset") or requested
    parts = []
    if fallback:
        parts.append(
            f"The requested VAE {requested!r} could not be loaded ({fallback}); the fallback {loaded!r} "
            "encoded the images instead."
        )
    if random_weights:
        parts.append(
            f"The VAE that encoded this dataset ({loaded!r}) has RANDOM weights, not trained ones: its "
            "latents do not represent the images, and decoding them gives noise. Do not train on it."
        )
    parts.append(
        "Rebuild with the real weights available (see the project's docs/VAES.md, 'VAE weights') before "
        "publishing it as a dataset."
    )
    return " ".join(parts)


def render_card(
    inputs: CardInputs,
    *,
    repo_id: str,
    license: str | None = IMAGENET_TERMS,
    parquet: bool = False,
    pretty_name: str | None = None,
    license_name: str | None = None,
    license_link: str | None = None,
) -> str:
    """README.md for the Hub repository ``repo_id``: YAML metadata, then the markdown body.

    ``license``: ``IMAGENET_TERMS``, None or "" (the default: ``license: other`` with ImageNet's terms of
    access as ``license_name``/``license_link``), or a Hub license identifier (for ``other``, give
    ``license_name`` and ``license_link``). ``parquet``: the repository also holds the parquet export
    under ``data/`` (the card then declares it as the default config and keeps the viewer on).
    """
    from huggingface_hub import DatasetCardData

    record = inputs.record
    shape = [int(d) for d in record.get("latent_shape") or mds_index.LATENT_SHAPE]
    samples = int(record.get("samples") or sum((record.get("per_class") or {}).values()))
    name = pretty_name or f"{repo_id.split('/')[-1]}: {'x'.join(map(str, shape))} uint8 VAE latents"
    imagenet = _is_imagenet(record)
    if not license or license == IMAGENET_TERMS:
        license, license_name, license_link = "other", IMAGENET_LICENSE_NAME, IMAGENET_LICENSE_LINK
    family = str((record.get("vae") or {}).get("family") or "vae")
    tags = ["latents", "vae", family, "mds", "uint8", "imagenet-int8"] + (["imagenet"] if imagenet else [])
    metadata: dict[str, Any] = {
        "license": license,
        "license_name": license_name,
        "license_link": license_link,
        "pretty_name": name,
        "task_categories": list(TASK_CATEGORIES),
        "size_categories": [size_category(samples)],
        "tags": list(dict.fromkeys(tags)),
    }
    if parquet:
        metadata["configs"] = [
            {"config_name": "default", "data_files": [{"split": "train", "path": PARQUET_FILES}]}
        ]
    else:
        metadata["viewer"] = False
    front = DatasetCardData(**{k: v for k, v in metadata.items() if v is not None}).to_yaml()
    sections = [
        f"# {_md(name)}",
        _warning_section(record),
        _about_section(inputs, repo_id, shape, samples, parquet, imagenet),
        _build_section(record, shape),
        _license_section(license, license_name, license_link, imagenet),
        _classes_section(inputs),
        _quality_section(inputs),
        _stats_section(inputs),
        _reading_section(record, repo_id, shape, parquet),
    ]
    body = "\n\n".join(s for s in sections if s)
    return f"---\n{front}\n---\n\n{body}\n"


def _is_imagenet(record: dict) -> bool:
    from imagenet_int8_assets.core.source.sources import imagenet_classes

    wnids = {row[0] for row in imagenet_classes()}
    classes = list(record.get("per_class") or {})
    return bool(classes) and all(c in wnids for c in classes)


def _md(text: Any) -> str:
    """``text`` as literal markdown: characters markdown would interpret are escaped (``|`` is left
    to ``markdown_table``, which escapes it in cells)."""
    text = str(text).replace("&", "&amp;").replace("\n", " ")
    return re.sub(r"([\\`*_\[\]<>#!~])", r"\\\1", text)


def _code(text: Any) -> str:
    """``text`` as inline code, with a fence longer than any backtick run inside it."""
    text = str(text).replace("\n", " ")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _num(value: Any, spec: str = ".4g") -> str:
    """A number for a table cell ("-" for None and NaN; other values as escaped text)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md(value)
    return format(value, spec)


def _warning_section(record: dict) -> str:
    warning = random_weights_warning(record)
    if warning is None:
        return ""
    return "\n\n".join([
        "## WARNING: not a real latent dataset",
        "> **" + _md(warning) + "**",
    ])


def _about_section(inputs: CardInputs, repo_id: str, shape: list[int], samples: int, parquet: bool, imagenet: bool) -> str:
    record = inputs.record
    classes = len(record.get("per_class") or {})
    vae = record.get("vae") or {}
    schema = record.get("schema") or {}
    size = (record.get("crops") or {}).get("size", "?")
    source = "ImageNet" if imagenet else "an image dataset"
    lines = [
        f"{samples:,} images of {source} ({classes:,} classes), centre-cropped to {size}x{size}, encoded by the "
        f"VAE {_code(vae.get('requested', '?'))} to {'x'.join(map(str, shape))} latents (channels x height x width), "
        f"quantized to uint8 and stored as [MosaicML MDS](https://docs.mosaicml.com/projects/streaming/) shards, "
        f"in the layout of [Imagenet.int8](https://huggingface.co/datasets/{PUBLISHED_DATASET}).",
    ]
    if schema.get("vae_output") == "uint8":
        lines.append(
            "The schema is the published one (`vae_output` with the custom `uint8` encoding, `label`, "
            "`label_as_text`): readers written for Imagenet.int8 read this dataset unchanged."
        )
    else:
        lines.append(
            f"The latent column uses streaming's built-in {_code(schema.get('vae_output', '?'))} encoding "
            "(the published `uint8` column holds only 4x32x32 latents quantized over +-12), so readers "
            "written for Imagenet.int8 need the code below."
        )
    files = [
        "- `index.json`, `classes/<class>/<version>/`: the MDS dataset (read the repository root as one dataset)",
        "- `build.json`: how it was built and how to decode it (the same record is in `index.json` under `imagenet_int8`)",
        "- `report/`: the reconstruction report (figures, `summary.json`, `report.md`, `metrics.csv`)",
        "- `stats/quantization_stats.json`: latent statistics per channel and per class",
    ]
    if parquet:
        files.append(
            "- `data/*.parquet`: the same samples as parquet, one file per class (columns `vae_output` "
            "the uint8 codes in C order as binary of exactly C*H*W bytes, `label` int, `label_as_text`, `image_id`), "
            "for `datasets` and the viewer"
        )
    return "\n\n".join(lines + ["Files:", "\n".join(files)])


def _build_section(record: dict, shape: list[int]) -> str:
    vae = record.get("vae") or {}
    crops = record.get("crops") or {}
    encode = record.get("encode") or {}
    value_range = recorded_range(record)
    size = crops.get("size", "?")
    recipe = crops.get("recipe", "?")
    recipe_text = _CROP_RECIPES.get(recipe, "").format(s=size, s2=2 * size if isinstance(size, int) else "2x")
    weights = {
        "hub": "trained weights from the Hugging Face Hub",
        "local-folder": "trained weights from a local folder",
        "random": "RANDOM weights (fixed seed), not trained",
    }.get(vae.get("source"), str(vae.get("source", "?")))
    if record.get("latent_value") == "mean":
        value = "`mean`: the posterior mean"
    elif vae.get("has_posterior") is False:
        value = f"{_code(record.get('latent_value', '?'))}: the encoder's output (this VAE has no posterior)"
    else:
        value = (
            f"{_code(record.get('latent_value', '?'))}: mean + std * eps, with eps drawn for each image from "
            "a generator seeded by the run seed and the image id (a rebuild gives the same bytes)"
        )
    factors = [f"scaling {vae['scaling_factor']:g}" if vae.get("scaling_factor") else "",
               f"shift {vae['shift_factor']:g}" if vae.get("shift_factor") else ""]
    rows = [
        ("VAE (requested)", _code(vae.get("requested", "?"))),
        ("VAE family", _code(vae.get("family", "?"))),
        ("weights", weights + (f" (fallback: {_md(vae['fallback_reason'])})" if vae.get("fallback_reason") else "")),
        ("repository", _repository(vae)),
        ("revision", _code(vae["revision"]) if vae.get("revision") else "-"),
        ("weights SHA-256", _code(vae["weights_sha256"]) if vae.get("weights_sha256") else "-"),
        ("latent shape", f"{'x'.join(map(str, shape))} per image (channels x height x width)"),
        ("scaling / shift factor", (" , ".join(f for f in factors if f) or "-")
         + " (recorded only: the stored latents are raw, not scaled or shifted)"),
        ("crop recipe", f"{_code(recipe)}: {recipe_text}" if recipe_text else _code(recipe)),
        ("crop size", f"{size}x{size}"),
        ("precision", _code(record.get("precision", "?"))),
        ("latent value", value),
        ("seed", _code(record.get("seed", "?"))),
        ("quantization range", f"+-{value_range:g} (step {step(value_range):.4f}; round to nearest, values beyond the range clipped)"),
        ("decode", _code(record.get("dequantize") or mds_index.dequantize_formula(value_range))),
        ("store_flip", "yes: `vae_output_flip` holds the latent of the horizontally flipped crop"
         if record.get("store_flip") else "no"),
        ("schema", _code(json.dumps(record.get("schema") or {}, sort_keys=True))),
        ("encoded on", ", ".join(f"{k} {_code(encode[k])}" for k in ("device_type", "torch") if encode.get(k)) or "-"),
    ]
    table = markdown_table([{"setting": k, "value": v} for k, v in rows])
    return "## How it was built\n\n" + table


def _repository(vae: dict) -> str:
    repo = vae.get("repo_id")
    if not repo:
        return "-"
    if vae.get("source") == "hub" and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        return f"[{_code(repo)}](https://huggingface.co/{repo})"
    return _code(repo)


def _license_section(license: str, license_name: str | None, license_link: str | None, imagenet: bool) -> str:
    if license_name == IMAGENET_LICENSE_NAME:
        text = (
            f"The latents are derived from ImageNet images, so this dataset is shared under ImageNet's "
            f"[terms of access]({IMAGENET_LICENSE_LINK}) (non-commercial research and educational use; "
            "the images belong to their owners). The Hub has no license identifier for those terms, "
            f"hence `license: other` with `license_name: {IMAGENET_LICENSE_NAME}`. This is the default "
            "of the card; pass another license when the source images are under other terms."
        )
        if not imagenet:
            text += (
                " **Note:** the classes of this build are not ImageNet classes: set the license of its "
                "actual source."
            )
        return "## License\n\n" + text
    link = f" ([terms]({license_link}))" if license_link else ""
    named = f" ({_code(license_name)})" if license_name else ""
    return f"## License\n\n{_code(license)}{named}{link}, as set by the publisher of this build."


def _classes_section(inputs: CardInputs) -> str:
    record = inputs.record
    per_class = record.get("per_class") or {}
    counts = list(per_class.values())
    parts = ["## Classes and counts"]
    if counts:
        ordered = sorted(counts)
        parts.append(
            f"{sum(counts):,} samples in {len(counts):,} classes: {ordered[0]:,} to {ordered[-1]:,} per class "
            f"(median {ordered[len(ordered) // 2]:,})."
        )

        def sort_key(name):
            label = inputs.labels.get(name, (None, None))[0]
            return (0, label, name) if isinstance(label, int) else (1, 0, name)

        rows = []
        for name in sorted(per_class, key=sort_key):
            label, text = inputs.labels.get(name, (None, None))
            rows.append({
                "label": "-" if label is None else label,
                "class": _md(name),
                "label_as_text": "-" if text is None else _md(text),
                "samples": per_class[name],
            })
        parts.append(
            f"<details>\n<summary>Samples per class ({len(rows):,} classes)</summary>\n\n"
            + markdown_table(rows, ["label", "class", "label_as_text", "samples"])
            + "\n\n</details>"
        )
    else:
        parts.append("The dataset holds no class.")
    manifest = inputs.manifest
    if manifest is None:
        parts.append(f"Bad and skipped source files: unknown ({_md(inputs.missing.get('manifest', 'no manifest'))}).")
        return "\n\n".join(parts)
    parts.append(
        f"The source held {manifest['files']:,} files: {manifest['ok']:,} used, **{manifest['bad']:,} bad** "
        f"(unreadable or refused images) and **{manifest['skipped']:,} skipped** (not images, or second "
        "paths to files already read). Bad and skipped files are not in the dataset."
    )
    if manifest["reasons"]:
        shown = manifest["reasons"][:20]
        rows = [
            {"status": r["status"], "reason": _md(r["reason"]), "files": r["files"],
             "example": f"{_md(r['example'])}: {_md(r['example_reason'])}"}
            for r in shown
        ]
        parts.append(markdown_table(rows, ["status", "reason", "files", "example"]))
        if len(manifest["reasons"]) > len(shown):
            rest = manifest["reasons"][len(shown):]
            parts.append(f"... and {sum(r['files'] for r in rest):,} more files with {len(rest):,} other kinds of reason.")
    return "\n\n".join(parts)


def _quality_section(inputs: CardInputs) -> str:
    summary = inputs.summary
    head = "## Reconstruction quality"
    if summary is None:
        return f"{head}\n\nNo reconstruction report: {_md(inputs.missing.get('report', 'missing'))}."
    lpips = summary.get("lpips")
    if isinstance(lpips, (int, float)) and not isinstance(lpips, bool):
        lpips_text = _num(lpips)
    elif summary.get("lpips_float") is not None or summary.get("lpips_uint8") is not None:
        lpips_text = f"float {_num(summary.get('lpips_float'))}, uint8 {_num(summary.get('lpips_uint8'))}"
    else:
        lpips_text = _md(lpips) if lpips else "not computed"
    images = summary.get("images")
    intro = (
        f"For a seeded sample of {images if images is not None else '?'} images (the same on every run), each "
        "crop was decoded from its float latent and from its uint8 code (read back from the dataset) with "
        "the VAE that built it, and compared with the original crop (means over images)."
    )
    table = markdown_table(
        [
            {"metric": "PSNR (dB)", "from float latents": _num(summary.get("psnr_float")),
             "from uint8 codes": _num(summary.get("psnr_uint8"))},
            {"metric": "SSIM", "from float latents": _num(summary.get("ssim_float")),
             "from uint8 codes": _num(summary.get("ssim_uint8"))},
        ]
    )
    more = markdown_table(
        [
            {"measure": "PSNR lost by uint8 (float - uint8, dB)", "value": _num(summary.get("psnr_gap"))},
            {"measure": f"latent values clipped at +-{_num(summary.get('quant_range'), 'g')}",
             "value": _num(summary.get("clip_fraction"))},
            {"measure": "quantization RMSE (latent units)", "value": _num(summary.get("quant_rmse"))},
            {"measure": "LPIPS", "value": lpips_text},
        ]
    )
    parts = [head, intro, table, more]
    if "grid.png" in inputs.figures:
        parts.append(f"![{REPORT_FIGURES['grid.png']}](report/grid.png)\n\n*{REPORT_FIGURES['grid.png']}*")
    else:
        parts.append("The reconstruction grid (`report/grid.png`) is missing.")
    return "\n\n".join(parts)


def _stats_section(inputs: CardInputs) -> str:
    stats = inputs.stats
    head = "## Quantization statistics"
    if stats is None:
        return f"{head}\n\nNo quantization statistics: {_md(inputs.missing.get('stats', 'missing'))}."
    columns = ["channel", "min", "max", *REPORT_CHANNEL_COLUMNS[1:]]
    parts = [
        head,
        f"Per channel over the whole dataset (float latents before quantization; range +-{_num(stats.get('quant_range'), 'g')}, "
        f"step {_num(stats.get('step'))}); `clip_fraction` is the fraction of values beyond the range, "
        "`quant_rmse` the error the uint8 codes add.",
        markdown_table(stats.get("overall") or [], columns),
    ]
    recommended = (stats.get("recommended") or {}).get("note")
    if recommended:
        parts.append(f"Recommended range: {_md(recommended)}.")
    for name in ("histograms.png", "clip_fraction.png", "quant_rmse.png"):
        if name in inputs.figures:
            parts.append(f"![{REPORT_FIGURES[name]}](report/{name})")
    return "\n\n".join(parts)


def _download_dir(repo_id: str) -> str:
    return "./" + (re.sub(r"[^A-Za-z0-9._-]", "_", repo_id.split("/")[-1]) or "dataset")


def streaming_snippet(record: dict, download_dir: str) -> str:
    """Python that reads the dataset at ``download_dir`` with plain mosaicml-streaming.

    For the published schema it registers the ``uint8`` encoding exactly as the published readers
    do; for ``ndarray:uint8:C,H,W`` columns it dequantizes the shaped codes. ``latents`` is the
    first batch, decoded, (B, C, H, W) float32.
    """
    shape = [int(d) for d in record.get("latent_shape") or mds_index.LATENT_SHAPE]
    scale = repr(2 * recorded_range(record))
    column = (record.get("schema") or {}).get("vae_output", "uint8")
    dims = ", ".join(map(str, shape))
    flip = (
        "\n    # vae_output_flip: the latent of the horizontally flipped crop, decoded the same way"
        if record.get("store_flip") else ""
    )
    if column == "uint8":
        head = f'''from typing import Any

import numpy as np
import torch
from streaming import StreamingDataset
from streaming.base.format.mds.encodings import Encoding, _encodings


class uint8(Encoding):
    def encode(self, obj: Any) -> bytes:
        return obj.tobytes()

    def decode(self, data: bytes) -> Any:
        x = np.frombuffer(data, np.uint8).astype(np.float32)
        return (x / 255.0 - 0.5) * {scale}


# Required: mosaicml-streaming has a built-in 1-byte encoding also named "uint8"; without this
# line every sample silently reads as one number. Keep it at module level (DataLoader workers
# started by spawn re-import this module).
_encodings["uint8"] = uint8
'''
        decode = f'latents = batch["vae_output"].reshape(-1, {dims})  # decoded flattened: reshape'
    else:
        head = '''import torch
from streaming import StreamingDataset
'''
        decode = (
            f'codes = batch["vae_output"]  # uint8 (B, {dims}): {column} needs no registration\n'
            f"    latents = (codes.float() / 255.0 - 0.5) * {scale}"
        )
    return f'''{head}
remote_train_dir = "{download_dir}"  # where you downloaded this repository
local_train_dir = "./local_train_dir"  # streaming's cache

if __name__ == "__main__":
    train_dataset = StreamingDataset(
        local=local_train_dir,
        remote=remote_train_dir,
        split=None,
        shuffle=True,
        shuffle_algo="naive",
        num_canonical_nodes=1,
        batch_size=32,
    )
    train_dataloader = torch.utils.data.DataLoader(train_dataset, batch_size=32, num_workers=3)

    batch = next(iter(train_dataloader))
    {decode}
    labels = [int(label) for label in batch["label"]]  # stored as strings, e.g. "402"
    texts = batch["label_as_text"]{flip}
    print(latents.shape, labels[:4], texts[:4])
'''


def _reading_section(record: dict, repo_id: str, shape: list[int], parquet: bool) -> str:
    download_dir = _download_dir(repo_id)
    scale = 2 * recorded_range(record)
    vae = record.get("vae") or {}
    exclude = ' --exclude "data/*"' if parquet else ""
    dims = ", ".join(map(str, shape))
    parts = [
        "## How to read it",
        "Every reader decodes the uint8 codes `u` to latents with "
        f"{_code(record.get('dequantize') or mds_index.dequantize_formula(scale / 2))}. The latents are raw "
        f"(not multiplied by the VAE's scaling factor): decode them to images with {_code(vae.get('requested', 'the VAE'))} "
        "directly (`vae.decode(z)`), and scale them yourself for diffusion training if you want.",
        "### 1. With mosaicml-streaming (as the published Imagenet.int8 readers do)",
        f"```bash\npip install mosaicml-streaming\nhf download {repo_id} --repo-type dataset --local-dir {download_dir}{exclude}\n```",
        "```python\n" + streaming_snippet(record, download_dir) + "```",
        "### 2. With this project's loader",
        "With the `imagenet-int8-assets` package installed:",
        f'```python\nfrom imagenet_int8_assets.reader import load_latents\n\ndata = load_latents("{repo_id}")\n'
        f"# the uint8 codes (N, {dims}), the labels, the label texts and the decode parameters\n```",
    ]
    if parquet:
        parts += [
            "### 3. With `datasets` (the parquet export)",
            f'```python\nimport numpy as np\nfrom datasets import load_dataset\n\nds = load_dataset("{repo_id}", split="train")\n'
            f'row = ds[0]\ncodes = np.frombuffer(row["vae_output"], np.uint8).reshape({dims})\n'
            f'latent = (codes.astype(np.float32) / 255.0 - 0.5) * {scale!r}\n'
            'print(row["label"], row["label_as_text"], row["image_id"], latent.shape)\n```',
        ]
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Validation


def validate_card(text: str) -> list[str]:
    """Problems that would make the Hub refuse or misread ``text`` as a dataset card ([] = none).

    Offline: the card is parsed with huggingface_hub's ``DatasetCard`` (its YAML block into a
    ``DatasetCardData``) and the metadata checked against the Hub's license identifiers, size
    categories and task categories, and the ``configs`` structure that datasets reads.
    """
    import yaml
    from huggingface_hub import DatasetCard, DatasetCardData
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    if not REGEX_YAML_BLOCK.search(text):
        return ["no YAML metadata block: the card must start with '---', the metadata, and '---'"]
    try:
        card = DatasetCard(text)
    except yaml.YAMLError as exc:
        return [f"the YAML metadata is not valid YAML: {' '.join(str(exc).split())}"]
    except (ValueError, TypeError) as exc:
        return [f"the YAML metadata is not a valid dataset card header: {exc}"]
    data = card.data.to_dict()
    problems: list[str] = []
    try:
        DatasetCardData(**data).to_yaml()
    except Exception as exc:  # the metadata must survive huggingface_hub's own round trip
        problems.append(f"the metadata cannot be written back by huggingface_hub: {exc}")
    problems += _license_problems(data)
    problems += _listed("size_categories", data.get("size_categories"), HUB_SIZE_CATEGORIES, required=True)
    problems += _listed("task_categories", data.get("task_categories"), HUB_TASK_CATEGORIES, required=False)
    if "pretty_name" in data and not isinstance(data["pretty_name"], str):
        problems.append(f"pretty_name must be a string, not {data['pretty_name']!r}")
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        problems.append(f"tags must be a list of non-empty strings, not {tags!r}")
    if "viewer" in data and not isinstance(data["viewer"], bool):
        problems.append(f"viewer must be true or false, not {data['viewer']!r}")
    if "configs" in data:
        problems += _configs_problems(data["configs"])
    if not card.text.strip():
        problems.append("the card has no text after its metadata")
    return problems


def _license_problems(data: dict) -> list[str]:
    license = data.get("license")
    if license is None:
        return ["license is missing"]
    values = license if isinstance(license, list) else [license]
    problems = [
        f"license {value!r} is not a Hub license identifier (see https://huggingface.co/docs/hub/repositories-licenses; "
        "use 'other' with license_name and license_link for other terms)"
        for value in values
        if not isinstance(value, str) or value not in HUB_LICENSES
    ]
    if "other" in values:
        name = data.get("license_name")
        if not isinstance(name, str) or not _LICENSE_NAME.fullmatch(name):
            problems.append(
                f"license 'other' needs license_name, a lowercase slug of letters, digits, '-' and '.' (got {name!r})"
            )
        link = data.get("license_link")
        if not isinstance(link, str) or not link.strip():
            problems.append("license 'other' needs license_link: a URL or a file of the repository with the terms")
    return problems


def _listed(key: str, value: Any, allowed, required: bool) -> list[str]:
    if value is None:
        return [f"{key} is missing"] if required else []
    values = value if isinstance(value, list) else [value]
    if not values:
        return [f"{key} is empty"] if required else []
    return [
        f"{key}: {v!r} is not one of the Hub's values ({', '.join(sorted(allowed)[:12])}, ...)"
        if len(allowed) > 12 else f"{key}: {v!r} is not one of the Hub's values ({', '.join(allowed)})"
        for v in values
        if not isinstance(v, str) or v not in allowed
    ]


def _configs_problems(configs: Any) -> list[str]:
    if not isinstance(configs, list) or not configs:
        return [f"configs must be a non-empty list of {{config_name, data_files}} mappings, not {configs!r}"]
    problems, names = [], []
    for i, config in enumerate(configs):
        where = f"configs[{i}]"
        if not isinstance(config, dict):
            problems.append(f"{where} must be a mapping, not {config!r}")
            continue
        name = config.get("config_name")
        if not isinstance(name, str) or not name:
            problems.append(f"{where} needs a config_name (a non-empty string)")
        names.append(name)
        files = config.get("data_files")
        if files is None:
            problems.append(f"{where} ({name}) needs data_files")
        elif not _data_files_ok(files):
            problems.append(
                f"{where} ({name}): data_files must be a path pattern, a list of them, or a list of "
                f"{{split, path}} mappings with split names of letters, digits and '_' (got {files!r})"
            )
    duplicates = sorted(n for n, c in Counter(n for n in names if isinstance(n, str)).items() if c > 1)
    if duplicates:
        problems.append(f"configs: config_name {', '.join(map(repr, duplicates))} appears more than once")
    return problems


def _data_files_ok(files: Any) -> bool:
    def paths_ok(value):
        return (isinstance(value, str) and bool(value)) or (
            isinstance(value, list) and bool(value) and all(isinstance(p, str) and p for p in value)
        )

    if isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return paths_ok(files)
    if not isinstance(files, list) or not files:
        return False
    return all(
        isinstance(f, dict) and set(f) == {"split", "path"} and isinstance(f["split"], str)
        and bool(_SPLIT.fullmatch(f["split"])) and paths_ok(f["path"])
        for f in files
    )


__all__ = [
    "CardInputs",
    "IMAGENET_TERMS",
    "card_inputs",
    "manifest_summary",
    "random_weights_warning",
    "render_card",
    "size_category",
    "streaming_snippet",
    "validate_card",
]
