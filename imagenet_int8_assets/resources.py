"""Settings for the asset graph: one Dagster resource, fed from environment variables.

Every field can also be overridden per run in the Dagster launchpad (resources.settings.config).
See the README's configuration table for meanings and defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

from imagenet_int8_assets.core.cifar import export_cifar10_as_folders, find_cifar10_root
from imagenet_int8_assets.core.encode import LATENT_VALUES, PRECISIONS
from imagenet_int8_assets.core.images import DEFAULT_MAX_PIXELS
from imagenet_int8_assets.core.parallel import default_workers
from imagenet_int8_assets.core.preprocess import DEFAULT_RECIPE, RECIPES, check_recipe
from imagenet_int8_assets.core.vae import DEFAULT_VAE
from imagenet_int8_assets.sample import generate_sample_dataset

DEFAULT_OUTPUT = "./imagenet_int8_data"
DEFAULT_MAX_PARTITIONS_PER_RUN = 50
SAMPLE_SOURCE = "sample"  # IMAGENET_INT8_SOURCE value (and default) meaning the bundled sample

ENV = {
    "source": "IMAGENET_INT8_SOURCE",
    "output": "IMAGENET_INT8_OUTPUT",
    "vae": "IMAGENET_INT8_VAE",
    "device": "IMAGENET_INT8_DEVICE",
    "batch_size": "IMAGENET_INT8_BATCH_SIZE",
    "crop_recipe": "IMAGENET_INT8_CROP_RECIPE",
    "crop_size": "IMAGENET_INT8_CROP_SIZE",
    "precision": "IMAGENET_INT8_PRECISION",
    "store_flip": "IMAGENET_INT8_STORE_FLIP",
    "seed": "IMAGENET_INT8_SEED",
    "latent_value": "IMAGENET_INT8_LATENT_VALUE",
    "quant_range": "IMAGENET_INT8_QUANT_RANGE",
    "max_pixels": "IMAGENET_INT8_MAX_PIXELS",
    "workers": "IMAGENET_INT8_WORKERS",
    "max_partitions_per_run": "IMAGENET_INT8_MAX_PARTITIONS_PER_RUN",
    "report_per_class": "IMAGENET_INT8_REPORT_PER_CLASS",
    "report_grid_images": "IMAGENET_INT8_REPORT_GRID_IMAGES",
    "report_max_psnr_gap": "IMAGENET_INT8_REPORT_MAX_PSNR_GAP",
    "report_max_clip_fraction": "IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION",
    "report_blocking": "IMAGENET_INT8_REPORT_BLOCKING",
    "probe_per_class": "IMAGENET_INT8_PROBE_PER_CLASS",
    "probe_pool": "IMAGENET_INT8_PROBE_POOL",
    "probe_max_classes": "IMAGENET_INT8_PROBE_MAX_CLASSES",
    "cifar_split": "IMAGENET_INT8_CIFAR_SPLIT",
}


class SettingsError(ValueError):
    """A setting has a value that cannot work; the message names the variable and the fix."""


class ImagenetInt8Settings(ConfigurableResource):
    """Where the data is, which VAE encodes it, and how (see README: Configuration)."""

    source: str = Field(default=SAMPLE_SOURCE, description="Folder of class subfolders, an ImageNet root with train/, or 'sample'.")
    output: str = Field(default=DEFAULT_OUTPUT, description="Output root for every artifact.")
    vae: str = Field(default=DEFAULT_VAE, description="VAE preset name, Hub id, or local diffusers folder.")
    vae_fallback: str = Field(default="", description="Random preset to use when real weights cannot be loaded (the demo sets sdxl-random; empty = fail).")
    device: str = Field(default="auto", description="auto (GPU when present), cpu or cuda.")
    batch_size: int = Field(default=16, description="Images per VAE forward pass.")
    crop_recipe: str = Field(default=DEFAULT_RECIPE, description=f"One of {', '.join(RECIPES)}.")
    crop_size: int = Field(default=256, description="Crop side in pixels: 256 (published) or 512 (a multiple of 8).")
    precision: str = Field(default="fp32", description="Encode precision: fp32, bf16 or fp16 (NaN/Inf samples are redone in fp32).")
    store_flip: bool = Field(default=False, description="Also store the latent of the horizontally flipped crop (vae_output_flip).")
    seed: int = Field(default=0, description="Run seed for per-image latent sampling.")
    latent_value: str = Field(default="sample", description="Stored latent: 'sample' (seeded per image) or 'mean'.")
    quant_range: float = Field(default=0.0, description="uint8 range +-R; 0 = the VAE's default (SDXL: 12, as published).")
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, description="Refuse images declaring more pixels.")
    workers: int = Field(default=0, description="Processes for scanning and cropping (0 = all cores).")
    report_per_class: int = Field(default=4, description="Images per class decoded for the reconstruction report (seeded sample).")
    report_grid_images: int = Field(default=8, description="Rows in the reconstruction grid image.")
    report_max_psnr_gap: float = Field(default=1.0, description="Check threshold: mean PSNR loss (dB) of uint8 vs float latents.")
    report_max_clip_fraction: float = Field(default=0.05, description="Check threshold: fraction of latent values clipped by the range.")
    report_blocking: bool = Field(default=False, description="When true a failed reconstruction check is an error (blocks), else a warning.")
    probe_per_class: int = Field(default=20, description="Latents per class used by the latent probe (seeded subsample).")
    probe_max_classes: int = Field(default=100, description="Classes used by the latent probe (a seeded subset when there are more).")
    probe_pool: int = Field(default=8, description="Latents are average-pooled to probe_pool x probe_pool before the probe.")
    cifar_split: str = Field(default="train", description="For a CIFAR-10 source: train, test or all.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> ImagenetInt8Settings:
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
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate_values()
        return settings

    def validate_values(self) -> None:
        try:
            check_recipe(self.crop_recipe)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if self.latent_value not in LATENT_VALUES:
            raise SettingsError(
                f"IMAGENET_INT8_LATENT_VALUE={self.latent_value!r}: use one of {', '.join(LATENT_VALUES)}."
            )
        if self.cifar_split not in ("train", "test", "all"):
            raise SettingsError(f"IMAGENET_INT8_CIFAR_SPLIT={self.cifar_split!r}: use train, test or all.")
        for name in ("batch_size", "crop_size", "max_pixels", "report_per_class", "report_grid_images", "probe_per_class", "probe_pool", "probe_max_classes"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{ENV.get(name, name)} must be positive, got {getattr(self, name)}.")
        if self.crop_size % 8:
            raise SettingsError(f"IMAGENET_INT8_CROP_SIZE must be a multiple of 8 (256 or 512), got {self.crop_size}.")
        if self.quant_range < 0:
            raise SettingsError(f"IMAGENET_INT8_QUANT_RANGE must be positive (or 0 for the VAE's default), got {self.quant_range}.")
        if self.precision not in PRECISIONS:
            raise SettingsError(f"IMAGENET_INT8_PRECISION={self.precision!r}: use one of {', '.join(PRECISIONS)}.")

    # ---- derived values -------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser().resolve()

    @property
    def is_sample(self) -> bool:
        return self.source == SAMPLE_SOURCE

    def source_path(self) -> Path:
        """The folder of class folders the graph reads.

        The bundled sample is generated under the output root on first use; a CIFAR-10 "python
        version" folder is exported once to ``<output>/cifar10_<split>/<class>/*.png`` (lossless;
        the crop recipe then upsamples the 32x32 images to the crop size).
        """
        if self.is_sample:
            return generate_sample_dataset(self.output_path / "sample_source")
        path = Path(self.source).expanduser().resolve()
        cifar = find_cifar10_root(path) if path.is_dir() else None
        if cifar is not None:
            return export_cifar10_as_folders(cifar, self.output_path / f"cifar10_{self.cifar_split}", self.cifar_split)
        return path

    def range_for(self, vae_default: float) -> float:
        """The uint8 range: the configured one, or the VAE's default when not set (0)."""
        return self.quant_range if self.quant_range > 0 else vae_default

    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else default_workers()


def max_partitions_per_run(environ: dict[str, str] | None = None) -> int:
    """Partitions per batched run (BackfillPolicy), from IMAGENET_INT8_MAX_PARTITIONS_PER_RUN."""
    env = os.environ if environ is None else environ
    raw = env.get(ENV["max_partitions_per_run"], "").strip()
    if not raw:
        return DEFAULT_MAX_PARTITIONS_PER_RUN
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingsError(f"IMAGENET_INT8_MAX_PARTITIONS_PER_RUN must be a positive integer, got {raw!r}.")
    return value
