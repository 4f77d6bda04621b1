"""Settings for the asset graph: one Dagster resource, fed from environment variables.

Every field can also be overridden per run in the Dagster launchpad (resources.settings.config).
The meanings and defaults are the fields' descriptions, rendered in docs/CONFIGURATION.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from imagenet_int8_assets.core.source.cifar import export_cifar10_as_folders, find_cifar10_root
from imagenet_int8_assets.core.crops.crop_store import CROP_STORAGES, DEFAULT_CROP_STORAGE
from imagenet_int8_assets.core.latents.encode import LATENT_VALUES, PRECISIONS
from imagenet_int8_assets.core.hub.hub_upload import DEFAULT_TIMEOUT as HUB_TIMEOUT_S
from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS
from imagenet_int8_assets.core.common.parallel import default_workers
from imagenet_int8_assets.core.crops.preprocess import DEFAULT_RECIPE, RECIPES, check_recipe
from imagenet_int8_assets.core.source.sources import SourceError, list_class_folders, resolve_source_root
from imagenet_int8_assets.core.latents.latent_store import DEFAULT_LATENT_STORAGE, LATENT_STORAGES
from imagenet_int8_assets.core.latents.vae import (
    DEFAULT_VAE,
    PRESETS,
    RANDOM_PRESETS,
    VaeLoadError,
    check_vae,
)
from imagenet_int8_assets.core.latents.devices import check_device_name, resolve_device
from imagenet_int8_assets.sample import generate_sample_dataset

DEFAULT_OUTPUT = "./imagenet_int8_data"
DEFAULT_MAX_PARTITIONS_PER_RUN = 125
DEFAULT_REFRESH_CRON = "0 3 * * *"  # the refresh_source schedule: every day at 03:00 (instance time zone)
SAMPLE_SOURCE = "sample"  # IMAGENET_INT8_SOURCE value (and default) meaning the bundled sample
# Crop side bounds: the report's SSIM needs 11x11 images (so 16, the first multiple of 8 above);
# 1024 (3 MiB per crop, the SDXL VAE's native size) keeps a class's crops and a VAE batch in memory.
MIN_CROP_SIZE, MAX_CROP_SIZE = 16, 1024
# The seed is hashed with each image id (core.latents.encode.image_seed) and also seeds numpy and
# scikit-learn (report and probe samples, probe models), which take 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

# Every field's environment variable is IMAGENET_INT8_<FIELD NAME> (the table is derived from the
# fields below, after the class); plus one that is not a resource field (see OTHER_VARIABLES):
PARTITIONS_PER_RUN_VAR = "IMAGENET_INT8_MAX_PARTITIONS_PER_RUN"
ENV: dict[str, str] = {}  # filled after ImagenetInt8Settings

# Environment variables that are not fields of ImagenetInt8Settings, as (name, default, meaning) in
# Markdown: docs/CONFIGURATION.md lists them after the fields (imagenet_int8_assets.settings_reference).
OTHER_VARIABLES: tuple[tuple[str, str, str], ...] = (
    (
        PARTITIONS_PER_RUN_VAR,
        f"`{DEFAULT_MAX_PARTITIONS_PER_RUN}`",
        "Classes per batched run (backfills and `imagenet-int8 build`): 8 runs for ImageNet-1k in a backfill; "
        "`imagenet-int8 build` makes the first and last of its runs small (an eighth, 16 classes) when a build has "
        "more than two full runs, so that the parts before the first encode and after the last are short: 10 runs "
        "(16, 7 x 125, 93, 16). The least orchestration overhead measured (see "
        "[BENCHMARKS.md](BENCHMARKS.md#class-runs-at-once-measured-beside-a-simulated-gpu)); on an N-GPU node use "
        "at most classes / N so that every GPU gets a run. Read when the definitions load (the backfill policy), "
        "so not settable in the launchpad; `imagenet-int8 build --max-partitions-per-run` overrides it.",
    ),
    (
        "HF_TOKEN",
        "unset",
        "Hub token with write access, read by `hub_upload` as a Dagster `EnvVar` (never stored in run config, logs, "
        "metadata or files); unset = huggingface_hub's own login (`hf auth login`).",
    ),
    (
        "HF_ENDPOINT",
        "unset (huggingface.co)",
        "Another Hub; credentials in it (`http://user:password@host`) are sent as basic auth and shown only as "
        "`***` (see [Credentials in HF_ENDPOINT](PUBLISHING.md#credentials-in-hf_endpoint)).",
    ),
    (
        "S3_ENDPOINT_URL",
        "unset (AWS)",
        "The endpoint of an S3-compatible store that is not AWS (MinIO, R2, Ceph...), for "
        "`IMAGENET_INT8_MDS_REMOTE` and for reading `s3://` datasets; credentials come from boto3's usual chain "
        "(`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a profile or an instance role).",
    ),
    (
        "IMAGENET_INT8_DEMO_VAE_FALLBACK",
        "`sdxl-random`",
        "`imagenet-int8 demo` only: the random preset used when real weights are unavailable (`tiny-random` "
        "makes the demo fast: about 20 s instead of about a minute on 2 CPU cores).",
    ),
    (
        "DAGSTER_HOME",
        "`<output>/dagster_home` (CLI)",
        "The Dagster instance the CLI records runs in; a writable folder (or one that can be created). "
        "`dagster dev` needs it set to the same folder to show those runs.",
    ),
    (
        "DAGSTER_PG_HOST",
        "unset",
        "The PostgreSQL instance's host (see "
        "[PostgreSQL](BEYOND_ONE_MACHINE.md#postgresql-one-instance-for-every-machine)): with it set, "
        "`imagenet-int8` writes the PostgreSQL `dagster.yaml` into a new `DAGSTER_HOME`, and the five "
        "`DAGSTER_PG_*` variables are then required.",
    ),
    ("DAGSTER_PG_PORT", "unset", "The PostgreSQL server's port (a number, e.g. 5432)."),
    ("DAGSTER_PG_DB", "unset", "The PostgreSQL database."),
    ("DAGSTER_PG_USERNAME", "unset", "The PostgreSQL user."),
    ("DAGSTER_PG_PASSWORD", "unset", "The PostgreSQL password; may be empty (trust, `.pgpass`), never shown."),
)

# The settings that decide the bytes of the dataset an output holds. They are recorded in
# <output>/settings.json when the output is first built; every entry point then uses them, and a
# launch with different values is refused (docs/OPERATING.md: "One set of settings per output").
RECORDED = (
    "source", "cifar_split", "max_pixels", "crop_recipe", "crop_size", "vae", "vae_fallback",
    "precision", "latent_value", "seed", "store_flip", "quant_range",
)
SETTINGS_RECORD = "settings.json"
# Which settings decide each asset's bytes: its code version (docs/OPERATING.md, "Versions and staleness").
# crop_storage and latent_storage are in none of them, nor in RECORDED: they decide how crops and
# latents are kept, not their values (readers follow what each partition's files hold), so
# changing them marks nothing stale and re-encodes nothing; a class picks the new mode up when it
# is next built (re-materializing its preprocessed_crops alone converts it: same code version and
# inputs, so the same data version, and nothing downstream becomes stale).
BYTES_SETTINGS = {
    "raw_manifest": ("source", "cifar_split", "max_pixels"),
    "preprocessed_crops": ("crop_recipe", "crop_size", "max_pixels"),
    "vae_latents": ("vae", "vae_fallback", "precision", "latent_value", "seed", "store_flip"),
    "mds_shards": ("quant_range",),
    "quantization_stats": ("quant_range",),
    "mds_dataset": ("quant_range",),
    "reconstruction_report": ("seed", "report_per_class", "report_grid_images"),
    "probe_features": ("seed", "probe_per_class", "probe_max_classes", "probe_pool"),
    "latent_probe": ("seed",),
}
CODE_REVISION = "1"  # bump when the code changes what an asset writes for the same settings


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the variable and the fix."""


def _bad(name: str, value, accepted: str) -> SettingsError:
    """``VARIABLE=value: accepted``: one line naming the variable, the value and what works."""
    return SettingsError(f"{ENV.get(name, name)}={value!r}: {accepted}.")


def check_writable_folder(path: Path, variable: str) -> None:
    """``path`` is a folder in which files can be written, or can be created; else SettingsError.

    Creates nothing: a missing folder's nearest existing parent must be a writable folder.
    """
    shown = str(path)
    existing = next((p for p in (path, *path.parents) if p.exists() or p.is_symlink()), None)
    try:
        if existing == path and not path.is_dir():
            raise SettingsError(
                f"{variable}={shown!r} is a file, not a folder: point {variable} at a folder "
                "(it is created when missing)."
            )
        if existing is None or not existing.is_dir():
            raise SettingsError(
                f"{variable}={shown!r} cannot be created ({str(existing)!r} is not a folder): point {variable} at a "
                "folder you can write to."
            )
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        what = "is not writable" if existing == path else f"cannot be created in {str(existing)!r}"
        raise SettingsError(
            f"{variable}={shown!r} {what} ({exc.strerror or exc}): make it writable or point {variable} "
            "at another folder."
        ) from None


class ImagenetInt8Settings(ConfigurableResource):
    """Where the data is, which VAE encodes it, and how (see docs/CONFIGURATION.md)."""

    source: str = Field(
        default=SAMPLE_SOURCE,
        description=(
            "Folder of class subfolders, an ImageNet root that contains `train/`, or a CIFAR-10 \"python version\" "
            "folder (see [CIFAR-10](OUTPUT.md#cifar-10)). `sample` = the bundled sample dataset, generated under "
            "`<output>/sample_source` by the first `raw_manifest` run. Partitions are the class folders "
            "registered by the scan and the `class_folders` sensor (see [Live class "
            "partitions](OPERATING.md#live-class-partitions)). Set but empty is an error. Must not contain the "
            "output, nor lie inside it."
        ),
    )
    output: str = Field(
        default=DEFAULT_OUTPUT,
        description=(
            "Output root for every artifact (see [Output layout](OUTPUT.md#output-layout)): a writable folder, or "
            "one that can be created; not the source, not inside it."
        ),
    )
    vae: str = Field(
        default=DEFAULT_VAE,
        description=(
            "A preset (see [Presets](VAES.md#presets): `imagenet-int8 presets` lists them), a Hub id of a "
            "diffusers `AutoencoderKL`, a local `AutoencoderKL` folder, or a local AuraEquiVAE weights file."
        ),
    )
    vae_fallback: str = Field(
        default="",
        description=(
            "A random preset used when the real weights of `IMAGENET_INT8_VAE` cannot be loaded; empty = fail "
            "instead. The demo sets it (to `IMAGENET_INT8_DEMO_VAE_FALLBACK`, default `sdxl-random`). Recorded "
            "with the output, so the UI and automation use it too."
        ),
    )
    device: str = Field(
        default="auto",
        description=(
            "`auto` (GPU when there is one, else CPU), `cpu`, `cuda`, `cuda:N` (N < the GPUs torch sees; `cuda` "
            "needs a GPU)."
        ),
    )
    batch_size: int = Field(
        default=0,
        description=(
            "Images per VAE forward pass; `0` = auto: on a GPU, half the largest power of two (at most 256) that "
            "fits, found by trial forward passes when a run starts and cached per GPU model, VAE, precision and "
            "crop size in `<output>/.devices/encoder_profile.json`; on the CPU 16. On the CPU rounded down to a "
            "multiple of torch's thread count, at least one per thread, so results do not depend on it (see "
            "[Reproducibility](GUARANTEES.md#reproducibility-what-is-bit-identical-and-the-codecs-edges)); an "
            "out-of-memory pass is retried with half. The chosen value is in the `vae_latents` metadata "
            "(`batch_size_choice`) and the build record."
        ),
    )
    devices: str = Field(
        default="",
        description=(
            "Devices that encode, comma-separated (`cuda:0,cuda:1`; `cpu:0,cpu:1` simulate devices on the CPU); "
            "empty = every GPU torch sees (or the CPU). Every run that encodes leases one device for its duration "
            "(a lock under `<output>/.devices/` that dies with the process), and `imagenet-int8` sets the `gpu` "
            "pool limit to the device count, so N GPUs encode N batches of classes at once (see [On a GPU "
            "node](BEYOND_ONE_MACHINE.md#on-a-gpu-node))."
        ),
    )
    device_wait: int = Field(
        default=3600,
        description="Seconds a run waits for a free device before it fails (naming the holders).",
    )
    crop_recipe: str = Field(
        default=DEFAULT_RECIPE,
        description=(
            f"One of {', '.join(f'`{name}`' for name in RECIPES)}: `imagenet.int8` is pixel-identical to the "
            "published build, `adm` the guided-diffusion/DiT/SiT/EDM2 centre crop; see "
            "[Crop recipes](OUTPUT.md#crop-recipes)."
        ),
    )
    crop_size: int = Field(
        default=256,
        description=(
            "Crop side in pixels: 256 (published; 4x32x32 latents with an f8 VAE) or 512 (4x64x64); any multiple "
            f"of 8 from {MIN_CROP_SIZE} (the report's 11x11 SSIM window) to {MAX_CROP_SIZE} (3 MiB per crop)."
        ),
    )
    precision: str = Field(
        default="fp32",
        description=(
            "`fp32`, `bf16` or `fp16`. Any sample that comes out NaN/Inf in a lower precision is re-encoded in "
            "fp32 (see [Precision](VAES.md#precision))."
        ),
    )
    store_flip: bool = Field(
        default=False,
        description=(
            "Also store the latent of the horizontally flipped crop (`vae_output_flip` column) for flip "
            "augmentation without re-encoding."
        ),
    )
    seed: int = Field(
        default=0,
        description=(
            "Run seed for the per-image latent sample and the report's and probe's samples: 0 to `2**32 - 1` "
            "(numpy and scikit-learn take no more)."
        ),
    )
    latent_value: str = Field(
        default="sample",
        description=(
            "Value stored in the dataset: `sample` (as published, but seeded per image, so rebuilds give the same "
            "bytes) or `mean`."
        ),
    )
    quant_range: float = Field(
        default=0.0,
        description=(
            "uint8 range +-R; `0` = the VAE's default. The SDXL presets default to 12, what every published "
            "reader decodes; other VAEs to their own default (see [Presets](VAES.md#presets)). Finite and >= 0."
        ),
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        description="Files declaring more pixels are refused before decoding (decompression bombs).",
    )
    crop_storage: str = Field(
        default=DEFAULT_CROP_STORAGE,
        description=(
            "How `preprocessed_crops` keeps crops: `none` (no pixels: per image the sha256 of the crop and the "
            "source file's size and mtime; a build hashes the crops it encodes, so they are made once; "
            "`vae_latents` materialized alone and the report recompute the crop from the source and verify the "
            "hash, so a source file changed since fails with a message naming it), `png` (lossless, compress "
            "level 1: about 0.6x raw, ~5-8 ms per crop to write) or `raw` (uint8 `.npy`, 196,608 bytes per "
            "256x256 crop, fastest to re-encode). Does not change the dataset's bytes, is not recorded with the "
            "output and marks nothing stale; a class takes a new value when it is next built. See [Disk "
            "footprint](OUTPUT.md#disk-footprint)."
        ),
    )
    latent_storage: str = Field(
        default=DEFAULT_LATENT_STORAGE,
        description=(
            "What `vae_latents` keeps: `full` (posterior mean and std and the stored latent, float32) or `latent` "
            "(only the stored latent and its flip: a third of the space; the dataset, statistics, report and "
            "parquet export need nothing else, the probe then has no `mean+std` features). Does not change the "
            "dataset's bytes; not recorded, marks nothing stale. See [Disk footprint](OUTPUT.md#disk-footprint)."
        ),
    )
    workers: int = Field(
        default=0,
        description="Processes for scanning and cropping; 0 = all cores; negative is an error.",
    )
    report_per_class: int = Field(
        default=4,
        description=(
            "Images per class decoded for the reconstruction report (seeded sample); the demo uses 1. See "
            "[Reconstruction report](OUTPUT.md#reconstruction-report)."
        ),
    )
    report_grid_images: int = Field(
        default=8,
        description="Rows of the reconstruction grid image.",
    )
    report_max_psnr_gap: float = Field(
        default=1.0,
        description=(
            "Check threshold: mean PSNR (dB) lost by decoding the uint8 codes instead of the float latents; "
            "finite, >= 0."
        ),
    )
    report_max_clip_fraction: float = Field(
        default=0.05,
        description="Check threshold: fraction of latent values clipped by the uint8 range; 0 to 1.",
    )
    report_blocking: bool = Field(
        default=False,
        description=(
            "`false`: a failed `reconstruction_quality` check is a warning; `true`: an error that blocks the "
            "steps after it."
        ),
    )
    probe_per_class: int = Field(
        default=20,
        description=(
            "Latents per class for the latent probe (seeded subsample); see [Latent "
            "probe](OUTPUT.md#latent-probe)."
        ),
    )
    probe_max_classes: int = Field(
        default=100,
        description=(
            "Classes for the latent probe (a seeded subset when there are more: SVC and boosting grow with the "
            "class count)."
        ),
    )
    probe_pool: int = Field(
        default=8,
        description=(
            "Latents are average-pooled to this spatial size before the probe (4x32x32 -> 256 features); must "
            "divide the latent side (crop size / 8) or be at least it."
        ),
    )
    cifar_split: str = Field(
        default="train",
        description="For a CIFAR-10 source: `train`, `test` or `all`.",
    )
    automation: bool = Field(
        default=False,
        description=(
            "`true` starts the `build_automation` sensor when the code location loads (it encodes on the GPU by "
            "itself); else turn it on in the UI's Automation page. See "
            "[Automation](OPERATING.md#automation-and-the-schedule)."
        ),
    )
    sensor_interval: int = Field(
        default=30,
        description="Seconds between evaluations of the `class_folders` and `build_automation` sensors.",
    )
    refresh_cron: str = Field(
        default=DEFAULT_REFRESH_CRON,
        description=(
            "Cron of the `refresh_source` schedule (a rescan; stopped until turned on) and of the automation's "
            "daily retry of missing or failed classes."
        ),
    )
    mds_remote: str = Field(
        default="",
        description=(
            "Object storage the published dataset is also written to: `s3://bucket/prefix` on any S3-compatible "
            "store (endpoint from `S3_ENDPOINT_URL`, credentials from boto3's usual chain). `mds_shards` uploads "
            "each new class version, `mds_dataset` publishes `index.json` there last; see [Object "
            "storage](BEYOND_ONE_MACHINE.md#object-storage-the-dataset-in-a-bucket). Empty = the local folder "
            "only."
        ),
    )
    hub_repo: str = Field(
        default="",
        description=(
            "Hub dataset repository (`owner/name`) that `hub_upload` publishes to; empty = no `hub_upload` asset "
            "in the graph (a repository emptied for one run in the launchpad fails that run, saying how to enable "
            "publishing). See [Publishing](PUBLISHING.md)."
        ),
    )
    hub_private: bool = Field(
        default=True,
        description="Create the repository private (an existing repository keeps its visibility).",
    )
    hub_revision: str = Field(
        default="main",
        description="Branch to publish to; created from `main` when missing.",
    )
    hub_commit_message: str = Field(
        default="",
        description=(
            "Commit message; empty = `imagenet-int8: N samples in K classes, VAE <name>` (numbered `(i/n)` when "
            "an upload takes several commits)."
        ),
    )
    hub_license: str = Field(
        default="",
        description=(
            "License id in the card; empty = `other`, pointing at ImageNet's terms of access (the latents derive "
            "from ImageNet images, which may be used for non-commercial research and education only)."
        ),
    )
    hub_files_per_commit: int = Field(
        default=100,
        description="Most files per Hub commit (the Hub advises a few hundred at most).",
    )
    hub_timeout: int = Field(
        default=HUB_TIMEOUT_S,
        description=(
            "Seconds of silence after which `hub_upload` gives up a request to the Hub: connecting, or waiting "
            "for its next bytes (not a limit on a whole transfer, so large files still go up). The run then fails "
            "saying what it was doing; re-running resumes. A positive integer."
        ),
    )
    parquet_export: bool = Field(
        default=True,
        description=(
            "`hub_upload` also publishes the samples as parquet (`data/<class>.parquet`), read by `datasets` and "
            "the Hub viewer."
        ),
    )
    publish_random_weights: bool = Field(
        default=False,
        description=(
            "Let `hub_upload` publish a dataset encoded with random VAE weights (a fallback or a `*-random` "
            "preset); refused otherwise."
        ),
    )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> ImagenetInt8Settings:
        """Settings from IMAGENET_INT8_* variables and ``overrides`` (CLI flags); a setting given by
        neither takes the value recorded for the output (``settings.json``), else its default."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, var in ENV.items():
            if name in cls.model_fields and env.get(var, "").strip():
                raw = env[var].strip()
                kind = cls.model_fields[name].annotation
                try:
                    if kind is bool:
                        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                            raise ValueError
                        values[name] = raw.lower() in ("1", "true", "yes", "on")
                    else:
                        values[name] = kind(raw) if kind in (int, float) else raw
                except ValueError:
                    raise SettingsError(f"{var}={raw!r} is not a valid {kind.__name__}.") from None
        for name in ("source", "output"):  # an empty path is a mistake (an unset shell variable), not "default"
            if overrides.get(name) is None and ENV[name] in env and not env[ENV[name]].strip():
                raise _bad(name, env[ENV[name]], "empty; set a folder, or unset the variable for the default"
                           + (" (the bundled sample)" if name == "source" else f" ({DEFAULT_OUTPUT})"))
        values.update({k: v for k, v in overrides.items() if v is not None})
        output = values.get("output", DEFAULT_OUTPUT)
        recorded = read_recorded_settings(Path(output).expanduser().resolve())
        for name, value in (recorded or {}).items():
            if name in RECORDED and name not in values:
                values[name] = value
        if recorded and "quant_range" in recorded and values.get("vae", recorded.get("vae")) == recorded.get("vae"):
            # a range given as the value the recorded one stands for (12 for 0 with SDXL) is that
            # same setting: take the recorded form, so code versions and the record stay the same
            mine = {"quant_range": values.get("quant_range", 0.0), "vae": recorded.get("vae")}
            if _effective("quant_range", mine) == _effective("quant_range", recorded):
                values["quant_range"] = recorded["quant_range"]
        settings = cls(**values)
        settings.validate_values()
        return settings

    # ---- runs ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def yield_for_execution(self, context):
        """For the length of a run: hold the output's build lock in shared mode (``build_lock.
        share_build_lock``), so that no `imagenet-int8 build` writes the same files meanwhile (runs
        from the UI, `dagster asset materialize` and automation go on side by side). A run of a
        build holds nothing: the build holds the lock. Refused at once, naming the build, while one
        runs. Sensors and schedules (no run) take no lock."""
        from imagenet_int8_assets.core.common.build_lock import (
            BUILD_LOCK_VAR,
            BuildLockBusy,
            BuildLockError,
            share_build_lock,
        )

        own_build = os.environ.get(BUILD_LOCK_VAR) == str(self.output_path)
        with contextlib.ExitStack() as held:
            if context.dagster_run is not None and not own_build and self._lockable():
                try:
                    held.enter_context(share_build_lock(self.output_path))
                except BuildLockError:  # a filesystem without flock: no build can lock it either
                    pass
                except BuildLockBusy as exc:
                    from dagster import Failure

                    raise Failure(description=str(exc), allow_retries=False) from None
            yield self

    def _lockable(self) -> bool:
        """Whether the run takes the output's lock: the output is an existing folder that the settings
        accept (a missing output is created by the run itself; an output the settings refuse, e.g.
        inside the source, gets no lock file: the first step refuses it with its own message)."""
        if not self.output_path.is_dir():
            return False
        try:
            self.check_source_and_output()
        except (SettingsError, SourceError, OSError):
            return False
        return True

    # ---- one set of settings per output ---------------------------------------------------

    def recorded_values(self) -> dict:
        """The values of ``RECORDED`` (the source as an absolute path, or 'sample')."""
        values = {name: getattr(self, name) for name in RECORDED}
        if not self.is_sample:
            values["source"] = str(Path(self.source).expanduser().resolve())
        return values

    def settings_conflicts(self) -> list[str]:
        """``NAME: recorded -> this launch`` for every recorded setting this launch changes."""
        recorded = read_recorded_settings(self.output_path)
        if recorded is None:
            return []
        mine = self.recorded_values()
        return [
            f"{ENV[name]}: the output holds {recorded[name]!r}, this launch has {mine[name]!r}"
            for name in RECORDED
            if name in recorded and _effective(name, recorded) != _effective(name, mine)
        ]

    def conflict_message(self) -> str | None:
        """The one message that refuses a launch whose settings differ from the output's record
        (None when they agree): each difference, and the three ways out."""
        conflicts = self.settings_conflicts()
        if not conflicts:
            return None
        return (
            f"IMAGENET_INT8_OUTPUT={str(self.output_path)!r} holds a dataset built with other settings "
            f"({self.output_path / SETTINGS_RECORD}):\n  - " + "\n  - ".join(conflicts) + "\n"
            "Launch with the recorded values (unset those variables or launchpad values: the recorded ones then "
            "apply), choose another IMAGENET_INT8_OUTPUT, or rebuild this output with the new settings: "
            "`imagenet-int8 build --force` (records them)."
        )

    def require_recorded_settings(self) -> None:
        """Refuse (SettingsError) a launch whose settings differ from those the output was built with."""
        message = self.conflict_message()
        if message:
            raise SettingsError(message)

    def record_settings(self, replace: bool = False) -> Path:
        """Write ``settings.json`` for the output when it has none (or ``replace``); returns its path."""
        from imagenet_int8_assets.core.common.files import atomic_write_json

        path = self.output_path / SETTINGS_RECORD
        if replace or not path.is_file():
            atomic_write_json(path, self.recorded_values())
        return path

    def code_version(self, asset_name: str) -> str:
        """The asset's code version: the code revision and the settings that decide its bytes,
        readable in the UI (``1 crop_recipe=imagenet.int8 crop_size=256 ...``)."""
        values = self.recorded_values()
        parts = [
            f"{name}={values[name] if name in values else getattr(self, name)}"
            for name in BYTES_SETTINGS[asset_name]
        ]
        return " ".join([CODE_REVISION, *parts])

    def validate_values(self) -> None:
        """Every value on its own (no file system, no torch): raises SettingsError naming the variable."""
        if not self.source.strip():
            raise _bad(
                "source", self.source, "empty; set a folder of class folders, or 'sample' for the bundled sample"
            )
        if not self.output.strip():
            raise _bad("output", self.output, f"empty; set a folder (default {DEFAULT_OUTPUT})")
        if not self.vae.strip():
            raise _bad("vae", self.vae, "empty; use a preset (imagenet-int8 presets), a Hub id or a local folder")
        if self.vae_fallback and self.vae_fallback not in RANDOM_PRESETS:
            raise _bad("vae_fallback", self.vae_fallback, f"use one of {', '.join(RANDOM_PRESETS)}")
        try:
            check_device_name(self.device)
            check_recipe(self.crop_recipe)
        except (ValueError, VaeLoadError) as exc:
            raise SettingsError(str(exc)) from None
        if self.latent_value not in LATENT_VALUES:
            raise _bad("latent_value", self.latent_value, f"use one of {', '.join(LATENT_VALUES)}")
        if self.cifar_split not in ("train", "test", "all"):
            raise _bad("cifar_split", self.cifar_split, "use train, test or all")
        if self.crop_storage not in CROP_STORAGES:
            raise _bad(
                "crop_storage", self.crop_storage,
                "use none (recompute crops from the source, verified by hash; smallest), png (lossless, about 0.6x "
                "raw) or raw (uint8 .npy, 196,608 bytes per 256x256 crop)",
            )
        if self.latent_storage not in LATENT_STORAGES:
            raise _bad(
                "latent_storage", self.latent_storage,
                "use full (posterior mean, std and the stored latent) or latent (only the stored latent and its flip)",
            )
        if self.precision not in PRECISIONS:
            raise _bad("precision", self.precision, f"use one of {', '.join(PRECISIONS)}")
        if self.mds_remote:
            from imagenet_int8_assets.core.dataset.mds_remote import check_remote_url
            from imagenet_int8_assets.core.common.urls import redact_url

            try:
                check_remote_url(self.mds_remote)
            except ValueError as exc:  # shown redacted: the URL may hold credentials (refused)
                raise _bad("mds_remote", redact_url(self.mds_remote), str(exc).split(": ", 1)[-1].rstrip(".")) from None
        if self.hub_repo and not HUB_REPO_ID.fullmatch(self.hub_repo):
            raise _bad("hub_repo", self.hub_repo, "use a Hub repository id owner/name (letters, digits, '-', '_', '.')")
        if not self.hub_revision.strip():
            raise _bad("hub_revision", self.hub_revision, "empty; use a branch name such as main")
        if self.hub_timeout <= 0:
            raise _bad("hub_timeout", self.hub_timeout, f"use a positive number of seconds (default {HUB_TIMEOUT_S})")
        if self.batch_size < 0:
            raise _bad("batch_size", self.batch_size, "use a positive number of images per pass, or 0 for the largest that fits")
        if self.devices.strip():
            from imagenet_int8_assets.core.latents.devices import DeviceSettingError, parse_devices

            try:
                parse_devices(self.devices)
            except DeviceSettingError as exc:
                raise SettingsError(str(exc)) from None
        for name in ("hub_files_per_commit", "device_wait", "sensor_interval", "crop_size", "max_pixels", "report_per_class", "report_grid_images", "probe_per_class", "probe_pool", "probe_max_classes"):
            if getattr(self, name) <= 0:
                raise _bad(name, getattr(self, name), "must be a positive integer")
        if self.crop_size % 8 or not MIN_CROP_SIZE <= self.crop_size <= MAX_CROP_SIZE:
            raise _bad(
                "crop_size", self.crop_size,
                f"use a multiple of 8 from {MIN_CROP_SIZE} to {MAX_CROP_SIZE} (256 as published, 512)",
            )
        if not math.isfinite(self.quant_range) or self.quant_range < 0:
            raise _bad(
                "quant_range", self.quant_range,
                "use a finite range R > 0 (uint8 codes span +-R), or 0 for the VAE's default",
            )
        if not math.isfinite(self.report_max_psnr_gap) or self.report_max_psnr_gap < 0:
            raise _bad("report_max_psnr_gap", self.report_max_psnr_gap, "use a finite number of dB >= 0")
        if not 0 <= self.report_max_clip_fraction <= 1:  # also refuses NaN
            raise _bad("report_max_clip_fraction", self.report_max_clip_fraction, "use a fraction from 0 to 1")
        if self.workers < 0:
            raise _bad("workers", self.workers, "use 0 (all cores) or a positive number of processes")
        if not 0 <= self.seed <= MAX_SEED:
            raise _bad("seed", self.seed, f"use an integer from 0 to {MAX_SEED} (2**32 - 1)")
        from dagster._utils.schedules import is_valid_cron_string

        if not is_valid_cron_string(self.refresh_cron):
            raise _bad("refresh_cron", self.refresh_cron, "use a cron string such as '0 3 * * *' (every day at 03:00)")
        preset = PRESETS.get(self.vae)
        side = self.crop_size // (preset.downsample if preset is not None else 8)
        if self.probe_pool < side and side % self.probe_pool:
            raise _bad(
                "probe_pool", self.probe_pool,
                f"must divide the latent side {side} (IMAGENET_INT8_CROP_SIZE={self.crop_size} / 8) or be >= it",
            )

    def check_source_and_output(self) -> None:
        """The output is neither the source nor inside it, and the source is not inside the output.

        Symlinks are resolved. The bundled sample and a CIFAR-10 export are generated inside the
        output by design: they are not the user's source and are not checked.
        """
        if self.is_sample:
            return
        out, src = self.output_path, Path(self.source).expanduser().resolve()
        scanned = resolve_source_root(src).resolve() if src.is_dir() else src
        if out in (src, scanned):
            raise SettingsError(
                f"IMAGENET_INT8_OUTPUT={str(out)!r} is the source folder IMAGENET_INT8_SOURCE={str(src)!r}: the "
                "next build would read its own output as images. Choose an output outside the source."
            )
        if out.is_relative_to(scanned):
            raise SettingsError(
                f"IMAGENET_INT8_OUTPUT={str(out)!r} is inside IMAGENET_INT8_SOURCE={str(scanned)!r}: the next build "
                "would read its own output (report images, crops) as images. Choose an output outside the source."
            )
        if src.is_relative_to(out):
            raise SettingsError(
                f"IMAGENET_INT8_SOURCE={str(src)!r} is inside IMAGENET_INT8_OUTPUT={str(out)!r}, which the build "
                "writes and cleans up. Move the source out of the output, or choose another output."
            )

    def preflight(self, dagster_home: Path | None = None) -> str | None:
        """Check every setting before any work starts; raises SettingsError (or SourceError).

        Values, source and output not nested, the output (a writable folder, or one that can be
        created; ``dagster_home`` too when given; nothing is created), the source's class folders,
        the device (torch sees that GPU), the VAE (resolvable without loading weights; see
        ``core.latents.vae.check_vae``) and the bucket of ``mds_remote`` (exists and can be listed, in
        seconds: ``RemoteMds.check_bucket``), so a missing bucket stops the build before any encoding.
        Returns the reason the demo's VAE fallback will be used, or None.
        """
        self.validate_values()
        self.check_source_and_output()
        check_writable_folder(self.output_path, "IMAGENET_INT8_OUTPUT")
        if dagster_home is not None:
            check_writable_folder(dagster_home, "DAGSTER_HOME")
        if not self.is_sample:
            source = Path(self.source).expanduser().resolve()
            root = resolve_source_root(source)  # exists, or SourceError
            if find_cifar10_root(source) is None:
                list_class_folders(root)
        if self.mds_remote:
            from imagenet_int8_assets.core.dataset.mds_remote import RemoteError, RemoteMds

            try:
                RemoteMds(self.mds_remote).check_bucket()
            except RemoteError as exc:
                raise SettingsError(f"{ENV['mds_remote']}={self.mds_remote!r}: {exc}.") from None
        from imagenet_int8_assets.core.latents.devices import DeviceSettingError, visible_devices

        try:
            resolve_device(self.device)
            visible_devices(self.devices or None, self.device)  # every device of IMAGENET_INT8_DEVICES exists
            return check_vae(self.vae, fallback=self.vae_fallback or None)
        except DeviceSettingError as exc:
            raise SettingsError(str(exc)) from None
        except VaeLoadError as exc:
            raise SettingsError(str(exc)) from None

    def preflight_or_fail(self) -> None:
        """``preflight`` at the start of a Dagster run: a failed check is a ``dagster.Failure`` whose
        description is the same one-line message the CLI prints (no traceback to read)."""
        from dagster import Failure

        try:
            self.preflight()
        except (SettingsError, SourceError) as exc:
            raise Failure(description=str(exc), allow_retries=False) from None

    def require_recorded_settings_or_fail(self) -> None:
        """``require_recorded_settings`` at the start of every asset step (a one-line ``Failure``);
        also checks every value, since values set per run (launchpad, ``--config-json``) were not
        checked when the definitions loaded."""
        from dagster import Failure

        try:
            self.validate_values()
            self.require_recorded_settings()
        except SettingsError as exc:
            raise Failure(description=str(exc), allow_retries=False) from None

    # ---- derived values -------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser().resolve()

    @property
    def is_sample(self) -> bool:
        return self.source == SAMPLE_SOURCE

    def source_path(self) -> Path:
        """The folder of class folders the graph reads (no side effect: see ``prepare_source``).

        The bundled sample lives at ``<output>/sample_source``; a CIFAR-10 "python version" folder
        is read through its export at ``<output>/cifar10_<split>/<class>/*.png``.
        """
        if self.is_sample:
            return self.output_path / "sample_source"
        path = Path(self.source).expanduser().resolve()
        if path.is_dir() and find_cifar10_root(path) is not None:
            return self.output_path / f"cifar10_{self.cifar_split}"
        return path

    @property
    def source_is_generated(self) -> bool:
        """True for the bundled sample and a CIFAR-10 source (read through an export in the output)."""
        if self.is_sample:
            return True
        path = Path(self.source).expanduser().resolve()
        return path.is_dir() and find_cifar10_root(path) is not None

    def prepare_source(self) -> Path:
        """Make ``source_path()`` exist: generate the bundled sample, or export CIFAR-10 once
        (lossless; the crop recipe then upsamples the 32x32 images to the crop size). Called by
        ``raw_manifest`` and the CLI, never while the definitions load."""
        if self.is_sample:
            check_writable_folder(self.output_path, "IMAGENET_INT8_OUTPUT")
            return generate_sample_dataset(self.source_path())
        path = Path(self.source).expanduser().resolve()
        cifar = find_cifar10_root(path) if path.is_dir() else None
        if cifar is not None:
            check_writable_folder(self.output_path, "IMAGENET_INT8_OUTPUT")
            return export_cifar10_as_folders(cifar, self.source_path(), self.cifar_split)
        return path

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else default_workers()


ENV.update({name: f"IMAGENET_INT8_{name.upper()}" for name in ImagenetInt8Settings.model_fields})
ENV["max_partitions_per_run"] = PARTITIONS_PER_RUN_VAR


def as_run_defaults(settings: ImagenetInt8Settings) -> ImagenetInt8Settings:
    """``settings`` as the code location's resource: each value becomes the DEFAULT of its field in
    the resource's config schema, so that settings given per run (the launchpad's
    ``resources.settings.config``, ``dagster asset materialize --config-json``) override the
    environment's value by value. Dagster replaces a configured resource's config as a whole with
    the run's: ``{"seed": 7}`` would otherwise put every other field back to its class default (the
    output folder included). The type is a subclass of the same name (``isinstance`` holds)."""
    from pydantic import create_model

    fields = {
        name: (info.annotation, Field(default=getattr(settings, name), description=info.description))
        for name, info in ImagenetInt8Settings.model_fields.items()
    }
    subclass = create_model(
        ImagenetInt8Settings.__name__, __base__=ImagenetInt8Settings, __module__=__name__, **fields
    )
    subclass.__doc__ = ImagenetInt8Settings.__doc__
    return subclass()


def _effective(name: str, values: dict):
    """A recorded setting's value as it acts: a range of 0 is the VAE's default range, so 0 and
    the VAE's default (12 for SDXL) are the same setting; everything else as it is."""
    if name == "quant_range" and not values.get(name):
        from imagenet_int8_assets.core.latents.quantize import resolve_range
        from imagenet_int8_assets.core.latents.vae import vae_default_range

        default = vae_default_range(str(values.get("vae", "")))  # None: the VAE's config is not at hand
        return resolve_range(0.0, default) if default is not None else 0.0
    return values.get(name)


def read_recorded_settings(output: Path) -> dict | None:
    """The settings recorded for an output (``<output>/settings.json``), or None."""
    import json

    path = Path(output) / SETTINGS_RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SettingsError(
            f"{path} cannot be read ({exc}): it records the settings this output was built with. Restore it, or "
            "delete it to record the current settings at the next build."
        ) from None


def max_partitions_per_run(environ: dict[str, str] | None = None) -> int:
    """Partitions per batched run (BackfillPolicy), from IMAGENET_INT8_MAX_PARTITIONS_PER_RUN."""
    env = os.environ if environ is None else environ
    raw = env.get(PARTITIONS_PER_RUN_VAR, "").strip()
    if not raw:
        return DEFAULT_MAX_PARTITIONS_PER_RUN
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(f"IMAGENET_INT8_MAX_PARTITIONS_PER_RUN must be a positive integer, got {raw!r}.")
    return value
