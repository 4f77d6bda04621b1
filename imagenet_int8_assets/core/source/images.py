"""Opening image files safely: size limits before decoding, and odd modes made RGB-ready."""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image

# PIL's own decompression-bomb threshold is 2 * 89,478,485 pixels; ImageNet's largest train image
# is far below that. Files declaring more are refused before any pixel is decoded.
DEFAULT_MAX_PIXELS = 178_956_970

# Modes that ImageNet itself contains; crop recipes treat them exactly as the published build did.
NATIVE_MODES = frozenset({"RGB", "L", "CMYK"})


class ImageRejected(ValueError):
    """A file that cannot be used as an image; the message is the reason recorded for it."""


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` lazily, refusing files whose declared size exceeds ``max_pixels``.

    Our limit replaces PIL's global one (so a user can raise it); nothing is decoded here.
    """
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = Image.open(path)
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageRejected(f"invalid size {width}x{height}")
    if width * height > max_pixels:
        img.close()
        raise ImageRejected(
            f"declared size {width}x{height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (possible decompression bomb; raise IMAGENET_INT8_MAX_PIXELS if the "
            "file is genuine)"
        )
    return img


def normalize_mode(img: Image.Image) -> Image.Image:
    """Bring modes ImageNet never contains to RGB or L; leave RGB, L and CMYK untouched.

    - alpha (RGBA, LA, PA, P or L with transparency) is composited onto white; dropping alpha
      would expose whatever colour the transparent pixels happen to store;
    - palette images become RGB (resizing a palette image would use nearest-neighbour);
    - 16/32-bit integer and float greyscale are scaled to 8 bits (I;16 by 1/257; I by its range;
      F is taken as 0..255 and clipped);
    - 1-bit images become L; other modes (YCbCr, LAB, HSV, ...) are converted to RGB.
    """
    mode = img.mode
    if mode in NATIVE_MODES:
        return img
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "P":
        return img.convert("RGB")
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 257.0
        elif mode == "I":
            peak = float(arr.max()) if arr.size else 0.0
            arr = arr / 257.0 if peak > 255 else arr
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")
