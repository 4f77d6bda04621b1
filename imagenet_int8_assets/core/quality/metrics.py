"""Image-quality metrics for reconstructions: PSNR, SSIM, summaries, and whether LPIPS can run.

Pure numpy (no Dagster, no scipy needed). Images are ``H x W x C`` (or ``H x W``) arrays, uint8 or
float, on the scale given by ``data_range`` (255 for uint8 pictures).

SSIM follows Wang, Bovik, Sheikh & Simoncelli (2004) and their reference MATLAB code
(``ssim_index.m``): an 11x11 Gaussian window with sigma 1.5 (normalised to sum 1),
``K1 = 0.01``, ``K2 = 0.03``, population (not sample) local statistics, and **valid-region**
filtering: the SSIM map is only computed where the whole window lies inside the image (an
``(H-10) x (W-10)`` map), then averaged. Colour images are scored per channel on float64 and the
channel scores are averaged. (scikit-image's ``structural_similarity(..., gaussian_weights=True,
use_sample_covariance=False)`` filters with reflected borders and then crops 5 pixels, which gives
the same numbers up to its truncation of the Gaussian at 3.5 sigma, i.e. the same 11x11 window.)
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
from collections.abc import Iterable

import numpy as np

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

LPIPS_UNAVAILABLE = (
    "LPIPS skipped: the lpips package and its AlexNet weights are not available locally "
    "(no downloads at run time)"
)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(f"expected an H x W or H x W x C image, got shape {x.shape}")
    return x, y


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / MSE)``, MSE over all values.

    Identical images give ``float("inf")``.
    """
    x, y = _pair(a, b)
    mse = float(np.mean(np.square(x - y)))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * math.log10(data_range * data_range / mse))


def gaussian_window_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian; its outer product with itself is MATLAB's ``fspecial``."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    w = np.exp(-(r * r) / (2.0 * sigma * sigma))
    return w / w.sum()


def _filter_valid(img: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with ``outer(w, w)`` (w is symmetric)."""
    k = w.size
    h, wd = img.shape
    rows = np.zeros((h - k + 1, wd), dtype=np.float64)
    for i in range(k):
        rows += w[i] * img[i : i + h - k + 1, :]
    out = np.zeros((h - k + 1, wd - k + 1), dtype=np.float64)
    for j in range(k):
        out += w[j] * rows[:, j : j + wd - k + 1]
    return out


def _ssim_channel(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    w = gaussian_window_1d()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x = _filter_valid(x, w)
    mu_y = _filter_valid(y, w)
    sxx = _filter_valid(x * x, w) - mu_x * mu_x
    syy = _filter_valid(y * y, w) - mu_y * mu_y
    sxy = _filter_valid(x * y, w) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def ssim(a, b, data_range: float = 255.0) -> float:
    """Mean SSIM (Wang et al. 2004; valid-region Gaussian filtering, see the module docstring).

    Per channel on float64, averaged over channels. Both sides must be at least 11 x 11.
    Identical images give exactly 1.0.
    """
    x, y = _pair(a, b)
    if x.shape[0] < SSIM_WINDOW or x.shape[1] < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {x.shape}")
    if np.array_equal(x, y):
        return 1.0
    if x.ndim == 2:
        return _ssim_channel(x, y, data_range)
    return float(np.mean([_ssim_channel(x[..., c], y[..., c], data_range) for c in range(x.shape[2])]))


def batch_metrics(originals, reconstructions, data_range: float = 255.0) -> list[dict]:
    """``[{"psnr": ..., "ssim": ...}, ...]``, one per image of two ``N x H x W x 3`` arrays."""
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    return [
        {"psnr": psnr(o, r, data_range), "ssim": ssim(o, r, data_range)}
        for o, r in zip(originals, reconstructions)
    ]


def summarize(values: Iterable[float]) -> dict:
    """``{mean, median, min, max, count, inf_count}`` of ``values``.

    ``count`` counts every value; ``inf_count`` how many were infinite (a PSNR of identical
    images). ``mean`` is over the finite values only (``inf`` if every value is ``+inf``);
    ``median``, ``min`` and ``max`` are over all values, so they can be ``inf``. NaN is refused.
    An empty input gives NaN statistics with ``count`` 0.
    """
    v = np.asarray(list(values), dtype=np.float64)
    if np.isnan(v).any():
        raise ValueError("summarize() got NaN values")
    nan = float("nan")
    if v.size == 0:
        return {"mean": nan, "median": nan, "min": nan, "max": nan, "count": 0, "inf_count": 0}
    finite = v[np.isfinite(v)]
    if finite.size:
        mean = float(finite.mean())
    else:  # all infinite
        mean = float(v[0]) if (v == v[0]).all() else nan
    return {
        "mean": mean,
        "median": float(np.median(v)),
        "min": float(v.min()),
        "max": float(v.max()),
        "count": int(v.size),
        "inf_count": int(v.size - finite.size),
    }


def lpips_available() -> tuple[bool, str]:
    """``(True, "")`` only if LPIPS could run offline right now, else ``(False, reason)``.

    LPIPS needs the ``lpips`` package (which ships its small linear heads) *and* the pretrained
    AlexNet backbone that torchvision fetches into the torch hub cache
    (``<hub dir>/checkpoints/alexnet-owt-*.pth``). Nothing is downloaded or imported beyond
    locating files; the package is not a dependency of this project.
    """
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.origin:
        return False, LPIPS_UNAVAILABLE
    heads = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", "alex.pth")
    if not os.path.isfile(heads):
        return False, f"LPIPS skipped: the lpips package has no AlexNet linear heads at {heads}"
    try:
        import torch.hub

        hub_dir = torch.hub.get_dir()
    except Exception as exc:  # torch missing or broken: LPIPS cannot run either
        return False, f"LPIPS skipped: torch is not usable ({exc})"
    checkpoints = os.path.join(hub_dir, "checkpoints")
    if not glob.glob(os.path.join(checkpoints, "alexnet-owt-*.pth")):
        return False, (
            f"LPIPS skipped: the AlexNet backbone weights are not in the local torch hub cache "
            f"({checkpoints}); no downloads at run time"
        )
    return True, ""


__all__ = ["psnr", "ssim", "batch_metrics", "summarize", "lpips_available", "gaussian_window_1d"]
