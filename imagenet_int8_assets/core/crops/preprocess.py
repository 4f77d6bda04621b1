"""Crop recipes: any image -> a ``size`` x ``size`` RGB uint8 array.

``imagenet.int8`` reproduces the published Imagenet.int8 build pixel for pixel (REFERENCE s1):
BICUBIC resize of the full-resolution image so the short side is ``size`` (long side truncated
with ``int``), a centre crop with the float box ``((w-size)/2, (h-size)/2, ...)`` that PIL rounds,
then conversion to RGB.

``adm`` is the research-standard centre crop of guided-diffusion/DiT/SiT/EDM2: halve with BOX
while the short side is >= 2*size, BICUBIC to short side ``size`` with ``round``ed sizes, integer
crop at ``((H-size)//2, (W-size)//2)``; RGB conversion first.

Both upscale images smaller than ``size``. When the intermediate resized image would be huge
(extreme aspect ratios such as 1x100000), only the source region under the crop is resampled
(``Image.resize(box=...)``); this changes nothing for ordinary photos and keeps memory bounded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from imagenet_int8_assets.core.source.images import DEFAULT_MAX_PIXELS, normalize_mode, open_image

RECIPES = ("imagenet.int8", "adm")
DEFAULT_RECIPE = "imagenet.int8"
DEFAULT_SIZE = 256
# Above this many pixels in the intermediate resized image, resample only the cropped region.
MAX_INTERMEDIATE_PIXELS = 1 << 23


class CropError(ValueError):
    """An image that could not be cropped; the message is the recorded reason."""


def _resize_and_crop(
    img: Image.Image, resized: tuple[int, int], left: int, top: int, size: int
) -> Image.Image:
    """``img.resize(resized, BICUBIC).crop((left, top, left+size, top+size))``, memory-bounded."""
    rw, rh = resized
    if rw * rh <= MAX_INTERMEDIATE_PIXELS:
        return img.resize(resized, Image.BICUBIC).crop((left, top, left + size, top + size))
    sx, sy = img.width / rw, img.height / rh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.BICUBIC, box=box)


def crop_imagenet_int8(img: Image.Image, size: int = DEFAULT_SIZE) -> Image.Image:
    """The published Imagenet.int8 recipe (see module docstring)."""
    img = normalize_mode(img)
    w, h = img.size
    if w < h:
        resized = (size, int(h * size / w))
    else:
        resized = (int(w * size / h), size)
    rw, rh = resized
    # PIL's crop rounds a float box with Python's round(); reproduce that for the offsets.
    left, top = round((rw - size) / 2), round((rh - size) / 2)
    return _resize_and_crop(img, resized, left, top, size).convert("RGB")


def crop_adm(img: Image.Image, size: int = DEFAULT_SIZE) -> Image.Image:
    """The ADM centre crop (see module docstring)."""
    img = normalize_mode(img).convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    resized = tuple(round(x * scale) for x in img.size)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return _resize_and_crop(img, resized, left, top, size)


_RECIPE_FUNCTIONS = {"imagenet.int8": crop_imagenet_int8, "adm": crop_adm}


def check_recipe(recipe: str) -> str:
    if recipe not in _RECIPE_FUNCTIONS:
        raise ValueError(
            f"Unknown crop recipe {recipe!r}. Set IMAGENET_INT8_CROP_RECIPE to one of: "
            + ", ".join(RECIPES)
        )
    return recipe


def crop_image(img: Image.Image, recipe: str = DEFAULT_RECIPE, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Apply ``recipe`` to an opened image; returns a (size, size, 3) uint8 array."""
    out = _RECIPE_FUNCTIONS[check_recipe(recipe)](img, size)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # pragma: no cover - guards the recipes' contract
        raise CropError(f"recipe produced shape {arr.shape}, expected {(size, size, 3)}")
    return arr


def crop_file(
    path: str | os.PathLike,
    recipe: str = DEFAULT_RECIPE,
    size: int = DEFAULT_SIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Open, decode and crop one file; raises ``CropError`` with a readable reason on failure."""
    try:
        with open_image(path, max_pixels) as img:
            img.load()
            return crop_image(img, recipe, size)
    except CropError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise CropError(f"cannot decode {os.fspath(path)!r}: {exc}") from exc


class CropTask(NamedTuple):
    """One file to crop, as ``crop_task`` takes it on a worker process (a tuple of plain values:
    pickled cheaply to the pools). Made by ``crop_tasks``."""

    path: str
    recipe: str
    size: int
    max_pixels: int


def crop_tasks(root: str | os.PathLike, ids: Iterable[str], recipe: str, size: int, max_pixels: int) -> list[CropTask]:
    """The crop tasks of image ``ids`` (paths relative to ``root``, or absolute), one per id, in order."""
    root, size, max_pixels = Path(root), int(size), int(max_pixels)
    return [CropTask(str(root / i), recipe, size, max_pixels) for i in ids]


def crop_task(task: CropTask) -> tuple[np.ndarray | None, str]:
    """Process-pool entry point: a ``CropTask`` -> (array or None, reason)."""
    path, recipe, size, max_pixels = task
    try:
        return crop_file(path, recipe, size, max_pixels), ""
    except CropError as exc:
        return None, str(exc)
