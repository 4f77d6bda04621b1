"""AuraEquiVAE (``fal/AuraEquiVAE``): the architecture.

A FLUX/LDM-style convolutional autoencoder, f8 with 16 latent channels. The input image is in
[-1, 1]; ``z = encoder(x).clamp(-8, 8)`` is the latent (``aura_latents.AURA_CLAMP``; no moments,
no quant_conv, no scaling factor); ``decoder(z)`` is the image in (nominally) [-1, 1]. Its latent
space is equivariant under image flips: see ``aura_latents``. The published weights load with
``aura_weights.load_aura_state_dict``.

This module defines ``nn.Module`` classes and therefore imports torch at top level; it is only
imported when an Aura model is requested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imagenet_int8_assets.core.latents.aura_latents import AURA_CLAMP

AURA_NUM_TENSORS = 232  # tensors in the published weights file (= this architecture's state dict)
AURA_NUM_PARAMS = 334_534_931



@dataclass(frozen=True)
class AuraConfig:
    """Hyper-parameters of the autoencoder; the defaults are the published AuraEquiVAE."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 256
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    head_dim: int = 64  # mid-block attention: num_heads = channels // head_dim
    norm_groups: int = 32
    norm_eps: float = 1e-6
    clamp: float = AURA_CLAMP

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty tuple of positive ints, got {self.ch_mult!r}")
        for width in self.widths:
            if width % self.norm_groups:
                raise ValueError(
                    f"GroupNorm groups ({self.norm_groups}) must divide every width; {width} "
                    f"(ch={self.ch} x ch_mult={self.ch_mult}) is not a multiple."
                )
        if self.mid_channels % self.head_dim:
            raise ValueError(
                f"head_dim ({self.head_dim}) must divide the mid-block width {self.mid_channels}."
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each resolution level (level 0 = full resolution)."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def mid_channels(self) -> int:
        return self.ch * self.ch_mult[-1]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


AURA_CONFIG = AuraConfig()


# --------------------------------------------------------------------------------------------------
# Building blocks


class _GroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 (stable when the model runs in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float32, torch.float64):
            return super().forward(x)
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def _norm(channels: int, cfg: AuraConfig) -> nn.GroupNorm:
    return _GroupNorm(cfg.norm_groups, channels, eps=cfg.norm_eps, affine=True)


def _conv3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=padding, bias=True)


class ResnetBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a (1x1-projected) residual."""

    def __init__(self, cin: int, cout: int, cfg: AuraConfig):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = _norm(cin, cfg)
        self.conv1 = _conv3(cin, cout)
        self.norm2 = _norm(cout, cfg)
        self.conv2 = _conv3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return skip + h


class AttnBlock(nn.Module):
    """Multi-head spatial self-attention over all H*W positions, with a residual.

    ``qkv`` is one bias-free 1x1 conv C -> 3C whose output channels are [q | k | v]; inside each of
    q, k, v the channels are grouped head by head (head-major, ``head_dim`` channels per head).
    """

    def __init__(self, channels: int, cfg: AuraConfig):
        super().__init__()
        self.channels = channels
        self.head_dim = cfg.head_dim
        self.num_heads = channels // cfg.head_dim
        self.norm = _norm(channels, cfg)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        # (B, 3C, H, W) -> (3, B, heads, H*W, head_dim)
        qkv = qkv.reshape(b, 3, self.num_heads, self.head_dim, h * w).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a 3x3 stride-2 conv without padding (halves H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (padding 1)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: AuraConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg)
        self.attn_1 = AttnBlock(channels, cfg)
        self.block_2 = ResnetBlock(channels, channels, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution level: ``block`` (a ModuleList) and an optional ``downsample``/``upsample``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class Encoder(nn.Module):
    def __init__(self, cfg: AuraConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = _conv3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList()
        cin = cfg.ch
        for level, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, width, cfg))
                cin = width
            stage = _Level(blocks)
            if level != len(widths) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = _MidBlock(cin, cfg)
        self.norm_out = _norm(cin, cfg)
        self.conv_out = _conv3(cin, cfg.z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AuraConfig):
        super().__init__()
        widths = cfg.widths
        cin = widths[-1]
        self.conv_in = _conv3(cfg.z_channels, cin)
        self.mid = _MidBlock(cin, cfg)
        stages: list[nn.Module] = [nn.Module()] * len(widths)
        for level in reversed(range(len(widths))):  # built coarse -> fine, indexed by level
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, widths[level], cfg))
                cin = widths[level]
            stage = _Level(blocks)
            if level != 0:
                stage.upsample = Upsample(cin)
            stages[level] = stage
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(cin, cfg)
        self.conv_out = _conv3(cin, cfg.out_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AuraEquiVAE(nn.Module):
    """The AuraEquiVAE autoencoder; state-dict keys match the published weights file."""

    def __init__(self, config: AuraConfig = AURA_CONFIG):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def latent_channels(self) -> int:
        return self.config.z_channels

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image (N, 3, H, W) in [-1, 1] -> latent (N, 16, H/8, W/8) clamped to +-8."""
        return self.encoder(x).clamp(-self.config.clamp, self.config.clamp)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image (N, 3, H, W), nominally in [-1, 1] (not clamped; see ``to_unit_range``)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def to_unit_range(y: torch.Tensor) -> torch.Tensor:
    """Decoder output in [-1, 1] -> image in [0, 1], clamped (as the model card does)."""
    return ((y + 1) / 2).clamp(0, 1)


def build_random_aura(config: AuraConfig = AURA_CONFIG, seed: int = 0) -> AuraEquiVAE:
    """An AuraEquiVAE with weights drawn from a fixed seed (same on every run), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AuraEquiVAE(config)
    return model.eval()
