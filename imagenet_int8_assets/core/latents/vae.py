"""VAE presets and loading.

``IMAGENET_INT8_VAE`` takes a preset name, a Hugging Face Hub model id, or a local folder. Every
preset declares its latent layout, input range, whether it has a posterior (mean/std), its
scaling/shift factors (recorded only: stored latents stay raw) and its default uint8 range;
``imagenet-int8 presets`` lists them. Real-weight presets load through the Hub (or the offline
HF cache, or a local folder); ``*-random`` presets build the same architecture (or a tiny one)
with fixed random weights for tests, smoke runs and offline benchmarks.

Loading never falls back silently: ``load_vae`` raises ``VaeLoadError`` saying why and what to do.
Only the demo passes ``fallback=...``, and the returned ``VaeInfo`` then says so.

torch and diffusers are imported only when a model is built, so the Dagster definitions load fast.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imagenet_int8_assets.core.latents.aura_latents import AURA_CLAMP
from imagenet_int8_assets.core.latents.quantize import DEFAULT_RANGE
from imagenet_int8_assets.core.common.files import file_sha256
from imagenet_int8_assets.core.common.urls import redact_urls

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
TINY = {"block_out_channels": [8, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 256}
FLUX_CONFIG: dict[str, Any] = {
    **SDXL_CONFIG,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
WEIGHT_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
RANDOM_WEIGHTS_SEED = 0
# The published +-12 for SDXL is 1.5633 units of *scaled* latent (12 * 0.13025). Presets without
# a better-known range get the same number of scaled units: range = 1.5633 / scaling_factor.
SDXL_RANGE_IN_SCALED_UNITS = DEFAULT_RANGE * SDXL_CONFIG["scaling_factor"]


def default_range(scaling_factor: float) -> float:
    return round(SDXL_RANGE_IN_SCALED_UNITS / scaling_factor, 2)


@dataclass(frozen=True)
class VaePreset:
    name: str
    description: str
    family: str = "autoencoder-kl"  # or "aura"
    hub_id: str | None = None  # real weights on the Hub
    subfolder: str | None = None  # e.g. "vae" inside a pipeline repository
    weights_file: str | None = None  # Aura: the single weights file
    config: Any = None  # the architecture: AutoencoderKL kwargs, or "aura" / "aura-tiny"
    random: bool = False  # True: built from ``config`` with fixed random weights, no download
    latent_channels: int = 4
    downsample: int = 8
    input_range: str = "[-1, 1]"
    has_posterior: bool = True
    scaling_factor: float | None = 0.13025
    shift_factor: float | None = None
    quant_range: float = DEFAULT_RANGE
    notes: str = ""

    @property
    def is_random(self) -> bool:
        return self.random

    def describe(self) -> dict[str, Any]:
        source = "random weights" if self.is_random else f"{self.hub_id}{'/' + self.subfolder if self.subfolder else ''}"
        return {
            "name": self.name,
            "weights": source,
            "channels": self.latent_channels,
            "downsample": self.downsample,
            "input": self.input_range,
            "posterior": "mean+std" if self.has_posterior else "none",
            "scaling": self.scaling_factor,
            "shift": self.shift_factor,
            "range": self.quant_range,
            "description": self.description,
        }


def _aura_config(tiny: bool):
    from imagenet_int8_assets.core.latents.aura_model import AURA_CONFIG, AuraConfig

    if not tiny:
        return AURA_CONFIG
    return AuraConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8, head_dim=16)


def _presets() -> dict[str, VaePreset]:
    sd1 = default_range(0.18215)
    flux = default_range(0.3611)
    aura = {"family": "aura", "latent_channels": 16, "has_posterior": False, "scaling_factor": None, "quant_range": AURA_CLAMP}
    sd1_config = {**SDXL_CONFIG, "scaling_factor": 0.18215, "sample_size": 512, "force_upcast": False}
    presets = (
        VaePreset("stabilityai/sdxl-vae", "SDXL VAE, the published Imagenet.int8 encoder", hub_id="stabilityai/sdxl-vae",
                  config=SDXL_CONFIG, notes="overflows in fp16: such samples are re-encoded in fp32"),
        VaePreset("madebyollin/sdxl-vae-fp16-fix", "SDXL VAE rescaled to run in fp16 (latents differ slightly)",
                  hub_id="madebyollin/sdxl-vae-fp16-fix", config={**SDXL_CONFIG, "force_upcast": False}),
        VaePreset("stabilityai/sd-vae-ft-ema", "SD1.x kl-f8 VAE (EMA-finetuned decoder; encoder = original SD)",
                  hub_id="stabilityai/sd-vae-ft-ema", config=sd1_config, scaling_factor=0.18215, quant_range=sd1),
        VaePreset("stabilityai/sd-vae-ft-mse", "SD1.x kl-f8 VAE (MSE-finetuned decoder; encoder = original SD)",
                  hub_id="stabilityai/sd-vae-ft-mse", config=sd1_config, scaling_factor=0.18215, quant_range=sd1,
                  notes="same encoder, hence same latents, as sd-vae-ft-ema"),
        VaePreset("flux1-vae", "FLUX.1 16-channel VAE (from black-forest-labs/FLUX.1-schnell, Apache-2.0)",
                  hub_id="black-forest-labs/FLUX.1-schnell", subfolder="vae", config=FLUX_CONFIG, latent_channels=16,
                  scaling_factor=0.3611, shift_factor=0.1159, quant_range=flux),
        VaePreset("fal/AuraEquiVAE", f"AuraEquiVAE: 16 channels, latents equivariant under flips, clamped to +-{AURA_CLAMP:g}",
                  hub_id="fal/AuraEquiVAE", weights_file="vae_epoch_3_step_49501_bf16.pt", config="aura", **aura),
        VaePreset("tiny-random", "f8 4-channel AutoencoderKL, tiny widths (tests, smoke runs)",
                  config={**SDXL_CONFIG, **TINY}, random=True),
        VaePreset("sdxl-random", "full SDXL VAE architecture (offline benchmarks)", config=SDXL_CONFIG, random=True),
        VaePreset("tiny-random-16", "f8 16-channel AutoencoderKL like FLUX's, tiny widths (tests)",
                  config={**FLUX_CONFIG, **TINY}, random=True, latent_channels=16, scaling_factor=0.3611,
                  shift_factor=0.1159, quant_range=flux),
        VaePreset("flux-random", "full FLUX.1 VAE architecture (offline benchmarks)", config=FLUX_CONFIG, random=True,
                  latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, quant_range=flux),
        VaePreset("aura-tiny-random", "AuraEquiVAE architecture, tiny widths (tests)", config="aura-tiny", random=True,
                  **aura),
        VaePreset("aura-random", "full AuraEquiVAE architecture (offline benchmarks)", config="aura", random=True, **aura),
    )
    return {p.name: p for p in presets}


PRESETS: dict[str, VaePreset] = _presets()
DEFAULT_VAE = "stabilityai/sdxl-vae"
RANDOM_PRESETS = tuple(name for name, p in PRESETS.items() if p.is_random)


class VaeLoadError(RuntimeError):
    """The VAE could not be loaded; the message says why and what to do."""


@dataclass
class VaeInfo:
    """What was loaded, recorded in asset metadata and the dataset's metadata."""

    requested: str
    source: str  # "hub", "local-folder", "random"
    family: str = "autoencoder-kl"
    repo_id: str | None = None
    revision: str | None = None
    folder: str | None = None
    weights_sha256: str | None = None
    latent_channels: int = 4
    downsample: int = 8
    has_posterior: bool = True
    scaling_factor: float | None = None
    shift_factor: float | None = None
    quant_range: float = DEFAULT_RANGE
    fallback_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_fallback(self) -> bool:
        return self.fallback_reason is not None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoadedVae:
    """A loaded VAE behind one interface: ``encode`` -> (mean, std or None), ``decode``.

    Inputs are images in [-1, 1], (N, 3, H, W); AuraEquiVAE has no posterior (std is None) and
    its latent is the encoder output clamped to +-8.
    """

    def __init__(self, model, info: VaeInfo):
        self.model = model
        self.info = info

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    def to(self, device: str, dtype=None) -> LoadedVae:
        import torch

        # nn.Module.to: diffusers' override warns about fp32-only modules even when nothing is cast
        self.model = torch.nn.Module.to(self.model, device=device, dtype=dtype, memory_format=torch.channels_last)
        return self

    def cast(self, dtype) -> LoadedVae:
        """A copy of this VAE in ``dtype`` (the original keeps its weights).

        Uses ``nn.Module.to`` directly: diffusers' override warns about modules "kept in float32"
        on every cast, and we cast everything on purpose (overflows are caught per sample).
        """
        import torch

        return LoadedVae(torch.nn.Module.to(copy.deepcopy(self.model), dtype=dtype), self.info)

    def encode(self, x):
        if self.info.family == "aura":
            return self.model.encode(x), None
        dist = self.model.encode(x).latent_dist
        return dist.mean, dist.std

    def decode(self, z):
        if self.info.family == "aura":
            return self.model.decode(z)
        return self.model.decode(z).sample


def build_random_vae(config: Any, seed: int = RANDOM_WEIGHTS_SEED):
    """A model with ``config`` (AutoencoderKL kwargs, "aura" or "aura-tiny") and fixed random weights."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if config in ("aura", "aura-tiny"):
            from imagenet_int8_assets.core.latents.aura_model import AuraEquiVAE

            model = AuraEquiVAE(_aura_config(tiny=config == "aura-tiny"))
        else:
            from diffusers import AutoencoderKL

            model = AutoencoderKL(**config)
    return model.eval()


def _help_text(spec: str, files: str) -> str:
    return (
        f"To use {spec!r} without network access: (1) on a machine with access run "
        f"`huggingface-cli download {spec}` and copy its Hugging Face cache (HF_HOME, default "
        "~/.cache/huggingface) here, then set HF_HUB_OFFLINE=1; or (2) set IMAGENET_INT8_VAE to a "
        f"local folder holding {files}. For a gated or private repository set HF_TOKEN. "
        "For a smoke run without real weights use IMAGENET_INT8_VAE=tiny-random."
    )


def _local_folder_info(spec: str, folder: Path, weights: Path | None) -> VaeInfo:
    return VaeInfo(
        requested=spec,
        source="local-folder",
        folder=str(folder.resolve()),
        weights_sha256=file_sha256(weights) if weights else None,
    )


def _snapshot(spec: str, repo_id: str, patterns: list[str], files: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing cache: all need the same advice
        raise VaeLoadError(  # the client's text quotes the URL it called: HF_ENDPOINT's credentials masked
            f"Could not load VAE weights for {spec!r}: {type(exc).__name__}: {redact_urls(str(exc)).rstrip('. ')}. "
            + _help_text(repo_id, files)
        ) from None


KL_FILES_TEXT = "config.json and diffusion_pytorch_model.safetensors (what AutoencoderKL.save_pretrained writes)"
LOCAL_WEIGHT_FILES = (WEIGHT_FILES[1], "diffusion_pytorch_model.bin")  # what from_pretrained reads
HUB_LOOKUP_TIMEOUT_S = 5.0


def _check_local_folder(folder: Path, need_weights: bool = False) -> None:
    """A local AutoencoderKL folder must hold config.json (and, to load, its weights)."""
    if not (folder / "config.json").is_file():
        raise VaeLoadError(
            f"VAE folder {str(folder)!r} has no config.json; it must be a diffusers AutoencoderKL "
            "folder (as written by save_pretrained) or hold an AuraEquiVAE weights file."
        )
    if need_weights and not any((folder / name).is_file() for name in LOCAL_WEIGHT_FILES):
        raise VaeLoadError(
            f"VAE folder {str(folder)!r} has a config.json but no weights ({' or '.join(LOCAL_WEIGHT_FILES)}); "
            "copy the whole folder written by AutoencoderKL.save_pretrained."
        )


def _check_hub_id(spec: str) -> None:
    """``spec`` (not a preset, not an existing path) must be a Hub id of the form 'owner/name'."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    valid = not spec.startswith((".", "/", "~")) and spec.count("/") == 1
    if valid:
        try:
            validate_repo_id(spec)
        except HFValidationError:
            valid = False
    if not valid:
        raise VaeLoadError(
            f"IMAGENET_INT8_VAE={spec!r} is neither a preset ({', '.join(PRESETS)}), an existing "
            "local folder, nor a Hub id of the form 'owner/name'."
        )


def _resolve_autoencoder_kl(spec: str, preset: VaePreset | None) -> tuple[Path, VaeInfo]:
    """A local diffusers folder for ``spec`` (a preset, a Hub id or a folder), plus provenance."""
    files = KL_FILES_TEXT
    folder = Path(spec).expanduser()
    if preset is None and folder.is_dir():
        _check_local_folder(folder)
        weights = folder / WEIGHT_FILES[1]
        return folder, _local_folder_info(spec, folder, weights if weights.is_file() else None)
    repo_id = preset.hub_id if preset is not None else spec
    subfolder = preset.subfolder if preset is not None else None
    if preset is None:
        _check_hub_id(spec)
    prefix = f"{subfolder}/" if subfolder else ""
    snapshot = _snapshot(spec, repo_id, [prefix + f for f in WEIGHT_FILES], files)
    folder = snapshot / subfolder if subfolder else snapshot
    weights = folder / WEIGHT_FILES[1]
    if not weights.is_file():
        raise VaeLoadError(f"The snapshot of {repo_id!r} at {str(folder)!r} has no {WEIGHT_FILES[1]}. " + _help_text(repo_id, files))
    return folder, VaeInfo(
        requested=spec, source="hub", repo_id=repo_id, revision=snapshot.name, folder=str(folder),
        weights_sha256=file_sha256(weights),
    )


def _load_autoencoder_kl(spec: str, preset: VaePreset | None):
    folder, info = _resolve_autoencoder_kl(spec, preset)
    from diffusers import AutoencoderKL

    try:
        model = AutoencoderKL.from_pretrained(str(folder), torch_dtype=None)
    except Exception as exc:
        raise VaeLoadError(
            f"VAE weights for {spec!r} found at {str(folder)!r} but diffusers could not load them as an "
            f"AutoencoderKL: {type(exc).__name__}: {exc}"
        ) from exc
    return model, info


def _load_aura(spec: str, preset: VaePreset | None, path: Path | None = None):
    """AuraEquiVAE from the Hub (the published file) or a local file/folder holding it."""
    from imagenet_int8_assets.core.latents.aura_model import AuraEquiVAE
    from imagenet_int8_assets.core.latents.aura_weights import (
        AURA_WEIGHTS_FILE,
        AuraWeightsError,
        load_aura_state_dict,
    )

    if path is None:
        assert preset is not None and preset.hub_id and preset.weights_file
        files = f"the weights file {preset.weights_file}"
        snapshot = _snapshot(spec, preset.hub_id, [preset.weights_file], files)
        path = snapshot / preset.weights_file
        info = VaeInfo(requested=spec, source="hub", repo_id=preset.hub_id, revision=snapshot.name, folder=str(snapshot))
    else:
        if path.is_dir():
            path = path / AURA_WEIGHTS_FILE
        info = VaeInfo(requested=spec, source="local-folder", folder=str(path.parent.resolve()))
    model = AuraEquiVAE()
    try:
        load_aura_state_dict(model, path)
    except AuraWeightsError as exc:
        raise VaeLoadError(str(exc)) from exc
    info.weights_sha256 = file_sha256(path)
    return model, info


def _is_aura_path(path: Path) -> bool:
    from imagenet_int8_assets.core.latents.aura_weights import AURA_WEIGHTS_FILE

    return (path.is_file() and path.suffix in (".pt", ".safetensors")) or (path / AURA_WEIGHTS_FILE).is_file()


def _check_hub_files(spec: str, repo_id: str, files: list[str], timeout: float) -> None:
    """Each file is in the local HF cache or, unless HF_HUB_OFFLINE is set, found by a metadata lookup."""
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers, get_session

    missing = [f for f in files if not isinstance(try_to_load_from_cache(repo_id, f), str)]
    described = " and ".join(files)
    if missing and constants.HF_HUB_OFFLINE:
        raise VaeLoadError(
            f"IMAGENET_INT8_VAE={spec!r}: {missing[0]} of {repo_id!r} is not in the local Hugging Face cache "
            f"and HF_HUB_OFFLINE is set. " + _help_text(repo_id, described)
        )
    for name in missing:
        try:  # one HEAD request, no retries: a lookup, not a download
            response = get_session().head(
                hf_hub_url(repo_id, name), headers=build_hf_headers(), timeout=timeout, allow_redirects=False
            )
            if response.status_code >= 400:
                raise OSError(f"HTTP {response.status_code}")
        except Exception as exc:  # network, auth, missing repository or file: the same advice
            reason = (redact_urls(str(exc)).strip().splitlines() or [""])[0][:200]
            raise VaeLoadError(
                f"IMAGENET_INT8_VAE={spec!r}: {name} of {repo_id!r} is neither in the local Hugging Face cache "
                f"nor found on the Hub ({type(exc).__name__}: {reason}). " + _help_text(repo_id, described)
            ) from None


# Parameters of the presets' architectures (counted on torch's meta device with diffusers 0.39):
# the SDXL/SD1.x AutoencoderKL 83,653,863, FLUX.1's 83,819,683, AuraEquiVAE 334,534,931
# (REFERENCE.md), the tiny test widths about 250,000.
FULL_KL_PARAMS, AURA_PARAMS, TINY_PARAMS = 83_819_683, 334_534_931, 260_000
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def weights_host_bytes(spec: str) -> int:
    """About how many bytes the VAE ``spec``'s weights take in host memory once loaded (fp32, as
    ``load_vae`` loads them), without loading anything: from the preset's architecture, twice the
    size of a local weights file or folder (files in fp16/bf16 double when cast to fp32; an fp32
    file is overestimated, which errs on the safe side), and the full SDXL size for a Hub id."""
    preset = PRESETS.get(spec)
    if preset is not None:
        if preset.name.startswith(("tiny-", "aura-tiny")):
            return TINY_PARAMS * 4
        return (AURA_PARAMS if preset.family == "aura" else FULL_KL_PARAMS) * 4
    path = Path(spec).expanduser()
    try:
        if path.is_file():
            return 2 * path.stat().st_size
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix in WEIGHTS_SUFFIXES and p.is_file()]
            if files:
                return 2 * max(p.stat().st_size for p in files)
    except OSError:
        pass
    return FULL_KL_PARAMS * 4


def _config_range(latent_channels: int, scaling_factor: float | None, otherwise: float) -> float:
    """The default uint8 range of an AutoencoderKL that is no preset, from its config."""
    if latent_channels == 4 and scaling_factor == SDXL_CONFIG["scaling_factor"]:
        return DEFAULT_RANGE  # SDXL-family weights: the published range
    return default_range(float(scaling_factor)) if scaling_factor else otherwise


def vae_default_range(spec: str) -> float | None:
    """The uint8 range ``IMAGENET_INT8_QUANT_RANGE=0`` means for the VAE ``spec`` (what ``load_vae``
    would record), without loading weights: the preset's, an AuraEquiVAE file's clamp, or from the
    ``config.json`` of a local folder or of a Hub id in the local cache; None when that config is
    not at hand."""
    import json

    preset = PRESETS.get(spec)
    if preset is not None:
        return preset.quant_range
    path = Path(spec).expanduser()
    if _is_aura_path(path):
        return AURA_CLAMP
    config = path / "config.json" if path.is_dir() else None
    if config is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
            config = Path(cached) if isinstance(cached, str) else None
        except Exception:  # not a valid repo id, no cache: unknown
            config = None
    try:
        cfg = json.loads(config.read_text()) if config is not None else None
    except (OSError, ValueError):
        cfg = None
    if not isinstance(cfg, dict):
        return None
    return _config_range(int(cfg.get("latent_channels", 4)), cfg.get("scaling_factor"), DEFAULT_RANGE)


def check_vae(spec: str, fallback: str | None = None, timeout: float = HUB_LOOKUP_TIMEOUT_S) -> str | None:
    """Check, without loading any weights, that ``load_vae(spec)`` can work.

    Random presets always can; a local AutoencoderKL folder needs config.json and its weights; a
    local AuraEquiVAE file must exist; a Hub id must be valid and every file the loader needs must
    be in the local HF cache or (when HF_HUB_OFFLINE is not set) found by a metadata lookup with
    a ``timeout`` of a few seconds. Returns None when the VAE can be loaded. When it cannot,
    raises ``VaeLoadError`` with the loader's advice, unless ``fallback`` names a random preset
    (the demo): then ``load_vae`` will fall back, and the reason is returned.
    """
    if fallback and fallback not in RANDOM_PRESETS:
        raise VaeLoadError(f"VAE fallback {fallback!r} must be one of the random presets: {', '.join(RANDOM_PRESETS)}.")
    preset = PRESETS.get(spec)
    try:
        if preset is not None and preset.is_random:
            return None
        if preset is None:
            path = Path(spec).expanduser()
            if _is_aura_path(path):
                return None
            if path.is_dir():
                _check_local_folder(path, need_weights=True)
                return None
            _check_hub_id(spec)
            repo_id, files = spec, list(WEIGHT_FILES)
        elif preset.family == "aura":
            repo_id, files = preset.hub_id, [preset.weights_file]
        else:
            prefix = f"{preset.subfolder}/" if preset.subfolder else ""
            repo_id, files = preset.hub_id, [prefix + f for f in WEIGHT_FILES]
        _check_hub_files(spec, repo_id, files, timeout)
    except VaeLoadError as exc:
        message = str(exc) if str(exc).startswith("IMAGENET_INT8_VAE=") else f"IMAGENET_INT8_VAE={spec!r}: {exc}"
        if not fallback:
            raise VaeLoadError(message) from None
        return message
    return None


def load_vae(spec: str = DEFAULT_VAE, fallback: str | None = None) -> LoadedVae:
    """Load a VAE on the CPU in fp32, in eval mode.

    ``spec``: a preset name, a Hub id of a diffusers AutoencoderKL, a local AutoencoderKL folder,
    or a local AuraEquiVAE weights file (or a folder holding the published file name).
    ``fallback`` names a random preset to use when real weights cannot be loaded (demo only).
    """
    preset = PRESETS.get(spec)
    try:
        if preset is not None and preset.is_random:
            model = build_random_vae(preset.config)
            info = VaeInfo(requested=spec, source="random", extra={"random_weights_seed": RANDOM_WEIGHTS_SEED})
        elif (preset is not None and preset.family == "aura") or (preset is None and _is_aura_path(Path(spec).expanduser())):
            model, info = _load_aura(spec, preset, None if preset is not None else Path(spec).expanduser())
        else:
            model, info = _load_autoencoder_kl(spec, preset)
    except VaeLoadError as exc:
        if fallback is None:
            raise
        loaded = load_vae(fallback)
        loaded.info.fallback_reason = str(exc)
        loaded.info.extra["loaded_preset"] = fallback  # what actually encoded: needed to decode
        loaded.info.requested = spec
        return loaded
    _describe(model, preset, info)
    return LoadedVae(model.float().eval(), info)


def load_vae_as_recorded(vae_info: dict) -> LoadedVae:
    """Load the VAE described by a recorded ``VaeInfo`` dict (e.g. to decode a built dataset).

    A demo fallback is reloaded as the random preset that actually encoded; otherwise the same
    request (preset, Hub id or folder). Raises ``VaeLoadError`` if the weights differ from the
    recorded SHA-256, since decoding with other weights would measure nothing.
    """
    loaded_preset = vae_info.get("extra", {}).get("loaded_preset")
    vae = load_vae(loaded_preset or vae_info["requested"])
    recorded, now = vae_info.get("weights_sha256"), vae.info.weights_sha256
    if recorded and now and recorded != now:
        raise VaeLoadError(
            f"The dataset was encoded with weights sha256 {recorded[:12]}... but {vae_info['requested']!r} now "
            f"loads {now[:12]}...; point IMAGENET_INT8_VAE / the HF cache at the weights that built it."
        )
    return vae


def _describe(model, preset: VaePreset | None, info: VaeInfo) -> None:
    """Fill ``info``'s layout and factors from the model itself (and the preset's range)."""
    if model.__class__.__name__ == "AuraEquiVAE":
        info.family, info.has_posterior = "aura", False
        info.latent_channels, info.downsample = model.latent_channels, model.downsample
        info.scaling_factor = info.shift_factor = None
        info.quant_range = preset.quant_range if preset is not None else AURA_CLAMP
        return
    cfg = model.config
    info.family, info.has_posterior = "autoencoder-kl", True
    info.latent_channels = int(cfg.latent_channels)
    info.downsample = 2 ** (len(cfg.block_out_channels) - 1)
    info.scaling_factor = getattr(cfg, "scaling_factor", None)
    info.shift_factor = getattr(cfg, "shift_factor", None)
    if preset is not None:
        info.quant_range = preset.quant_range
    else:
        info.quant_range = _config_range(info.latent_channels, info.scaling_factor, info.quant_range)
