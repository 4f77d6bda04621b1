"""VAE presets and loading.

``IMAGENET_INT8_VAE`` takes a preset name, a Hugging Face Hub model id, or a local folder:

- ``stabilityai/sdxl-vae``: the real SDXL VAE through diffusers ``from_pretrained`` (Hub, a
  local folder, or the offline HF cache);
- ``tiny-random``: an f8, 4-channel AutoencoderKL with small widths and seeded random weights
  (tests and smoke runs: the latent layout of SDXL at a tiny fraction of the cost);
- ``sdxl-random``: the full SDXL VAE architecture with seeded random weights (offline
  benchmarks: the real cost without the real weights);
- any other string: a Hub id or a local diffusers AutoencoderKL folder.

Loading never falls back silently: ``load_vae`` raises ``VaeLoadError`` saying why and what to do.
Only the demo passes ``fallback="sdxl-random"``, and the returned ``VaeInfo`` then says so.

Nothing here imports torch or diffusers at module import time, so the Dagster definitions load
fast; they are imported when a model is actually built.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagenet_int8_assets.core.storage import file_sha256

SDXL_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
TINY_CONFIG: dict[str, Any] = {
    **SDXL_CONFIG,
    "block_out_channels": [8, 16, 32, 32],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 256,
}
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
RANDOM_WEIGHTS_SEED = 0


@dataclass(frozen=True)
class VaePreset:
    name: str
    description: str
    hub_id: str | None = None  # real weights
    random_config: dict[str, Any] | None = None  # seeded random weights
    latent_channels: int = 4
    downsample: int = 8
    scaling_factor: float = 0.13025
    quant_range: float = 12.0


PRESETS: dict[str, VaePreset] = {
    p.name: p
    for p in (
        VaePreset(
            "stabilityai/sdxl-vae",
            "SDXL VAE, the published Imagenet.int8 encoder (real weights)",
            hub_id="stabilityai/sdxl-vae",
        ),
        VaePreset(
            "tiny-random",
            "f8 4-channel AutoencoderKL, tiny widths, seeded random weights (tests, smoke runs)",
            random_config=TINY_CONFIG,
        ),
        VaePreset(
            "sdxl-random",
            "full SDXL VAE architecture with seeded random weights (offline benchmarks)",
            random_config=SDXL_CONFIG,
        ),
    )
}
DEFAULT_VAE = "stabilityai/sdxl-vae"


class VaeLoadError(RuntimeError):
    """The VAE could not be loaded; the message says why and what to do."""


@dataclass
class VaeInfo:
    """What was loaded, recorded in asset metadata and the dataset's metadata."""

    requested: str
    source: str  # "hub", "local-folder", "random"
    repo_id: str | None = None
    revision: str | None = None
    folder: str | None = None
    weights_sha256: str | None = None
    latent_channels: int = 4
    downsample: int = 8
    scaling_factor: float | None = None
    fallback_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_fallback(self) -> bool:
        return self.fallback_reason is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VaeLoadError(
            "IMAGENET_INT8_DEVICE=cuda but torch sees no CUDA GPU. Use IMAGENET_INT8_DEVICE=auto "
            "(GPU when present, else CPU) or cpu."
        )
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise VaeLoadError(f"Unknown device {device!r}: use auto, cpu or cuda (cuda:N).")
    return device


def build_random_vae(config: dict[str, Any], seed: int = RANDOM_WEIGHTS_SEED):
    """An AutoencoderKL with ``config`` and weights drawn from a fixed seed (same on every run)."""
    import torch
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(**config)
    return model.eval()


def _help_text(spec: str) -> str:
    return (
        f"To use {spec!r} without network access: (1) on a machine with access run "
        f"`huggingface-cli download {spec}` and copy its Hugging Face cache (HF_HOME, default "
        "~/.cache/huggingface) here, then set HF_HUB_OFFLINE=1; or (2) set IMAGENET_INT8_VAE to a "
        "local folder holding config.json and diffusion_pytorch_model.safetensors (what "
        "AutoencoderKL.save_pretrained writes). For a gated or private repository set HF_TOKEN. "
        "For a smoke run without real weights use IMAGENET_INT8_VAE=tiny-random."
    )


def _resolve_pretrained(spec: str) -> tuple[Path, VaeInfo]:
    """A local folder with the weights for ``spec`` (a folder or a Hub id), plus provenance."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise VaeLoadError(
                f"VAE folder {str(folder)!r} has no config.json; it must be a diffusers "
                "AutoencoderKL folder (as written by save_pretrained)."
            )
        weights = next((folder / n for n in WEIGHT_FILES[1:] if (folder / n).is_file()), None)
        return folder, VaeInfo(
            requested=spec,
            source="local-folder",
            folder=str(folder.resolve()),
            weights_sha256=file_sha256(weights) if weights else None,
        )
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise VaeLoadError(
            f"IMAGENET_INT8_VAE={spec!r} is neither a preset ({', '.join(PRESETS)}), an existing "
            "local folder, nor a Hub id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(repo_id=spec, allow_patterns=list(WEIGHT_FILES)))
    except Exception as exc:  # network, auth, missing cache: all need the same advice
        raise VaeLoadError(
            f"Could not load VAE weights for {spec!r}: {type(exc).__name__}: {str(exc).rstrip('. ')}. "
            + _help_text(spec)
        ) from exc
    weights = snapshot / WEIGHT_FILES[1]
    if not weights.is_file():
        raise VaeLoadError(
            f"The snapshot of {spec!r} at {str(snapshot)!r} has no {WEIGHT_FILES[1]}. "
            + _help_text(spec)
        )
    return snapshot, VaeInfo(
        requested=spec,
        source="hub",
        repo_id=spec,
        revision=snapshot.name,
        folder=str(snapshot),
        weights_sha256=file_sha256(weights),
    )


def load_vae(spec: str = DEFAULT_VAE, fallback: str | None = None):
    """Load a VAE on the CPU in fp32, in eval mode. Returns (model, VaeInfo).

    ``fallback`` names a random preset to use when real weights cannot be loaded (demo only).
    """
    preset = PRESETS.get(spec)
    if preset is not None and preset.random_config is not None:
        model = build_random_vae(preset.random_config)
        info = VaeInfo(requested=spec, source="random", extra={"random_weights_seed": RANDOM_WEIGHTS_SEED})
    else:
        target = preset.hub_id if preset is not None else spec
        try:
            folder, info = _resolve_pretrained(target)
            from diffusers import AutoencoderKL

            try:
                model = AutoencoderKL.from_pretrained(str(folder), torch_dtype=None).eval()
            except Exception as exc:
                raise VaeLoadError(
                    f"VAE weights for {spec!r} found at {str(folder)!r} but diffusers could not load "
                    f"them as an AutoencoderKL: {type(exc).__name__}: {exc}"
                ) from exc
        except VaeLoadError as exc:
            if fallback is None:
                raise
            model, info = load_vae(fallback)
            info.fallback_reason = str(exc)
        info.requested = spec
    cfg = model.config
    info.latent_channels = int(cfg.latent_channels)
    info.downsample = 2 ** (len(cfg.block_out_channels) - 1)
    info.scaling_factor = float(getattr(cfg, "scaling_factor", 0.0) or 0.0) or None
    return model.float(), info
