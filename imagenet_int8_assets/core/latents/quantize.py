"""uint8 quantization of latents, and streaming per-channel statistics.

The published readers decode ``z = (u / 255 - 0.5) * 24`` (range +-12, step 24/255). Our encoder
is its exact inverse with round-to-nearest and clipping, so ``quantize(dequantize(u)) == u`` for
every byte and the error of an in-range value is at most half a step (RMS step/sqrt(12) for
uniformly spread values). The published build truncated instead of rounding (REFERENCE s1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

DEFAULT_RANGE = 12.0  # the published Imagenet.int8 range: what a record without a range decodes with
RANGE_KEY = "quant_range"  # the one name every record of codes (class and dataset build.json, stats) holds it under
LEVELS = 255
PERCENTILES = (0.1, 1.0, 50.0, 99.0, 99.9)
# Histogram used for percentiles: bins of width 1/128 (< a tenth of the +-12 step) over +-64.
HIST_LIMIT = 64.0
HIST_BINS = 1 << 14


def resolve_range(setting: float, vae_default: float) -> float:
    """The effective uint8 range +-R: ``IMAGENET_INT8_QUANT_RANGE`` when it is > 0, else the VAE's
    default (``VaeInfo.quant_range``: the preset's, an AuraEquiVAE's clamp, or from its config)."""
    return float(setting) if setting and setting > 0 else float(vae_default)


def codes_range(setting: float, latents_meta: Mapping) -> float:
    """The range one class's codes are made at: resolved from the setting and the VAE default that its
    latents' meta records (``meta["vae"]["quant_range"]``).

    The one place the range is decided. Only the steps that make codes from float latents call it
    (``mds_shards``, ``quantization_stats``: the setting is part of their code version, so a new
    range re-makes them and nothing else); they record the result under ``RANGE_KEY`` (a class's and
    the dataset's ``build.json``, the statistics), and every step after them reads it back with
    ``recorded_range``. The latents themselves do not depend on the range and do not record it.
    """
    vae = latents_meta.get("vae")
    if not isinstance(vae, Mapping) or RANGE_KEY not in vae:
        raise ValueError("latents meta without the VAE's default range (vae.quant_range); re-materialize vae_latents")
    return resolve_range(setting, vae[RANGE_KEY])


def recorded_range(record: Mapping) -> float:
    """The range a record of codes says they are quantized over: the one reader of every record.

    ``record["quant_range"]`` (a class's or the dataset's ``build.json`` and its index.json record,
    ``quantization_stats.json``); a dataset record without one (the published Imagenet.int8) decodes
    at ``DEFAULT_RANGE`` (+-12). Raises ValueError when the recorded value is not a finite positive
    number.
    """
    value = record.get(RANGE_KEY, DEFAULT_RANGE)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid {RANGE_KEY} {value!r}")
    return float(value)


def step(value_range: float = DEFAULT_RANGE) -> float:
    """One quantization step: 2 * range / 255 (0.0941 for +-12)."""
    return 2.0 * value_range / LEVELS


def quantize(z: np.ndarray, value_range: float = DEFAULT_RANGE) -> np.ndarray:
    """float latents -> uint8, round to nearest, clipped to [-range, range].

    Refuses (ValueError) a range that is not a finite positive number, and NaN or infinite
    latents: there is no honest code for them (NaN would silently become 0, +-Inf the clip bounds).
    """
    if not (isinstance(value_range, (int, float, np.floating, np.integer)) and np.isfinite(value_range) and value_range > 0):
        raise ValueError(
            f"quantization range {value_range!r} is not a finite positive number: set "
            "IMAGENET_INT8_QUANT_RANGE to a value > 0 (or 0 for the VAE's default)"
        )
    z = np.asarray(z, dtype=np.float64)
    finite = np.isfinite(z)
    if not finite.all():
        bad = z.size - int(np.count_nonzero(finite))
        raise ValueError(
            f"cannot quantize {bad} of {z.size} latent values: they are NaN or infinite (no uint8 code "
            "represents them); re-encode those images in fp32 (re-materialize vae_latents with "
            "IMAGENET_INT8_PRECISION=fp32) and check the VAE weights"
        )
    u = np.rint((z / (2.0 * value_range) + 0.5) * LEVELS)
    return np.clip(u, 0, LEVELS).astype(np.uint8)


def dequantize(u: np.ndarray, value_range: float = DEFAULT_RANGE) -> np.ndarray:
    """uint8 -> float32 latents, exactly the published decoder ``(u / 255 - 0.5) * 2 * range``."""
    return ((np.asarray(u, dtype=np.float32) / np.float32(LEVELS) - np.float32(0.5))
            * np.float32(2.0 * value_range))


@dataclass
class ChannelStats:
    """Mergeable running statistics of (N, C, H, W) latents, per channel."""

    channels: int
    value_range: float = DEFAULT_RANGE
    count: np.ndarray = field(init=False)
    total: np.ndarray = field(init=False)
    total_sq: np.ndarray = field(init=False)
    minimum: np.ndarray = field(init=False)
    maximum: np.ndarray = field(init=False)
    clipped: np.ndarray = field(init=False)
    non_finite: np.ndarray = field(init=False)
    quant_sq_err: np.ndarray = field(init=False)
    hist: np.ndarray = field(init=False)

    def __post_init__(self):
        c = self.channels
        self.count = np.zeros(c, np.int64)
        self.total = np.zeros(c, np.float64)
        self.total_sq = np.zeros(c, np.float64)
        self.minimum = np.full(c, np.inf)
        self.maximum = np.full(c, -np.inf)
        self.clipped = np.zeros(c, np.int64)
        self.non_finite = np.zeros(c, np.int64)
        self.quant_sq_err = np.zeros(c, np.float64)
        # bins 1..HIST_BINS cover [-HIST_LIMIT, HIST_LIMIT); 0 and HIST_BINS+1 are under/overflow
        self.hist = np.zeros((c, HIST_BINS + 2), np.int64)

    def update(self, latents: np.ndarray) -> None:
        z = np.asarray(latents, dtype=np.float64)
        if z.ndim != 4 or z.shape[1] != self.channels:
            raise ValueError(f"expected (N, {self.channels}, H, W) latents, got {z.shape}")
        if z.shape[0] == 0:
            return
        per_channel = np.moveaxis(z, 1, 0).reshape(self.channels, -1)
        for c in range(self.channels):
            v = per_channel[c]
            finite = np.isfinite(v)
            if not finite.all():  # NaN/Inf are counted, never mixed into the statistics
                self.non_finite[c] += int(v.size - np.count_nonzero(finite))
                v = v[finite]
            if v.size == 0:
                continue
            err = dequantize(quantize(v, self.value_range), self.value_range) - v
            bins = np.floor((v + HIST_LIMIT) * (HIST_BINS / (2 * HIST_LIMIT))).astype(np.int64) + 1
            self.count[c] += v.size
            self.total[c] += v.sum()
            self.total_sq[c] += np.square(v).sum()
            self.minimum[c] = min(self.minimum[c], v.min())
            self.maximum[c] = max(self.maximum[c], v.max())
            self.clipped[c] += int(np.count_nonzero(np.abs(v) > self.value_range))
            self.quant_sq_err[c] += np.square(err).sum()
            self.hist[c] += np.bincount(np.clip(bins, 0, HIST_BINS + 1), minlength=HIST_BINS + 2)

    def merge(self, other: ChannelStats) -> None:
        if other.channels != self.channels or other.value_range != self.value_range:
            raise ValueError("cannot merge statistics of different layouts or ranges")
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        self.clipped += other.clipped
        self.non_finite += other.non_finite
        self.quant_sq_err += other.quant_sq_err
        self.hist += other.hist

    def percentile(self, channel: int, q: float) -> float:
        """Percentile ``q`` (0-100) from the histogram, accurate to one bin (1/128)."""
        n = int(self.count[channel])
        if n == 0:
            return float("nan")
        target = q / 100.0 * n
        cum = np.cumsum(self.hist[channel])
        idx = int(np.searchsorted(cum, target, side="left"))
        idx = min(idx, HIST_BINS + 1)
        if idx == 0:
            return float(self.minimum[channel])
        if idx == HIST_BINS + 1:
            return float(self.maximum[channel])
        below = cum[idx - 1]
        inside = self.hist[channel, idx]
        frac = (target - below) / inside if inside else 0.0
        width = 2 * HIST_LIMIT / HIST_BINS
        value = -HIST_LIMIT + (idx - 1 + frac) * width
        return float(np.clip(value, self.minimum[channel], self.maximum[channel]))

    def totals(self) -> dict:
        """All channels together: value count, mean, fraction clipped and quantization RMSE."""
        n = int(self.count.sum())
        nan = float("nan")
        return {
            "values": n,
            "mean": float(self.total.sum() / n) if n else nan,
            "clip_fraction": float(self.clipped.sum() / n) if n else nan,
            "quant_rmse": float(np.sqrt(self.quant_sq_err.sum() / n)) if n else nan,
            "non_finite": int(self.non_finite.sum()),
        }

    def summary(self) -> list[dict]:
        """One dict per channel: min, max, mean, std, percentiles, clip fraction, RMSE."""
        rows = []
        for c in range(self.channels):
            n = int(self.count[c])
            mean = self.total[c] / n if n else float("nan")
            var = max(0.0, self.total_sq[c] / n - mean * mean) if n else float("nan")
            row = {
                "channel": c,
                "count": n,
                "min": float(self.minimum[c]) if n else float("nan"),
                "max": float(self.maximum[c]) if n else float("nan"),
                "mean": float(mean),
                "std": float(np.sqrt(var)) if n else float("nan"),
            }
            for q in PERCENTILES:
                row[f"p{q:g}"] = self.percentile(c, q)
            row["non_finite"] = int(self.non_finite[c])
            row["clip_fraction"] = float(self.clipped[c] / n) if n else float("nan")
            row["quant_rmse"] = float(np.sqrt(self.quant_sq_err[c] / n)) if n else float("nan")
            rows.append(row)
        return rows


def recommend_ranges(channels: list[dict], coverage: str = "p99.9", granularity: float = 0.5) -> dict:
    """A symmetric range (and one per channel) that keeps the ``coverage`` percentiles unclipped.

    Per channel: ``max(|p0.1|, |p99.9|)`` rounded up to ``granularity``; the common range is the
    largest of those. ``channels`` is ``ChannelStats.summary()``.
    """
    low = {"p99.9": "p0.1", "p99": "p1"}[coverage]
    per_channel = []
    for row in channels:
        if not row["count"]:
            continue
        bound = max(abs(row[low]), abs(row[coverage]))
        per_channel.append(float(np.ceil(bound / granularity) * granularity))
    common = max(per_channel) if per_channel else 0.0
    note = (
        f"+-{common:g} keeps {low}..{coverage} of every channel unclipped (step {step(common):.4f})"
        if per_channel
        else "no data"
    )
    return {"range": common, "per_channel": per_channel, "note": note}
