"""Settings for the asset graph: one Dagster resource, fed from environment variables.

Every field can also be overridden per run in the Dagster launchpad (resources.settings.config).
See the README's configuration table for meanings and defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field

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
        for name in ("batch_size", "crop_size", "max_pixels"):
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
        """The dataset root; for the sample, generated under the output root on first use."""
        if self.is_sample:
            return generate_sample_dataset(self.output_path / "sample_source")
        return Path(self.source).expanduser().resolve()

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
