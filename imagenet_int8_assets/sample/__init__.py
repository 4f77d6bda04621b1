"""The bundled sample dataset: generated, deterministic, small, and deliberately messy.

Four ImageNet classes (wnid folders, so labels follow the ILSVRC-2012 index) with synthetic
pictures whose colours and shapes depend on the class, in the variety real data has: RGB, greyscale
and CMYK JPEGs, a progressive JPEG, palette, RGBA and 16-bit PNGs, PNG data behind a .JPEG name,
an image smaller than the crop, an extreme panorama, a non-ASCII file name; plus bad files that
must be recorded and left out (truncated, empty, text posing as a JPEG, a decompression bomb) and
a non-image file that is skipped.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imagenet_int8_assets.core.common.files import atomic_dir

SAMPLE_VERSION = 1
SAMPLE_CLASSES = {
    "n01440764": (200, 60, 40),  # tench
    "n02102040": (40, 150, 70),  # English springer
    "n02979186": (50, 80, 200),  # cassette player
    "n03000684": (210, 190, 50),  # chain saw
}
MARKER = ".sample-complete"


def synthetic_picture(width: int, height: int, colour: tuple[int, int, int], seed: int) -> Image.Image:
    """A class-coloured picture: gradient background, random ellipses and bars, some noise."""
    rng = random.Random(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.array(colour, np.float32)
    t = (xx / max(1, width - 1) * rng.uniform(0.3, 1.0) + yy / max(1, height - 1) * rng.uniform(0.3, 1.0)) / 2
    arr = base[None, None, :] * (0.5 + t[..., None]) + 30 * np.sin(xx[..., None] / rng.uniform(5, 40))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        x1, y1 = x0 + rng.uniform(0.1, 0.5) * width, y0 + rng.uniform(0.1, 0.5) * height
        fill = tuple(int(np.clip(c + rng.uniform(-80, 80), 0, 255)) for c in colour)
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.rectangle((x0, y0, x1, y1), fill=fill, outline=(0, 0, 0))
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def _png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` (a decompression bomb stand-in)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _write_class(folder: Path, wnid: str, colour: tuple[int, int, int], index: int) -> None:
    seed = 1000 * index
    pic = lambda w, h, k: synthetic_picture(w, h, colour, seed + k)  # noqa: E731
    folder.mkdir(parents=True)
    pic(500, 375, 1).save(folder / f"{wnid}_0001.JPEG", quality=90)
    pic(375, 500, 2).save(folder / f"{wnid}_0002.JPEG", quality=90)
    pic(320, 320, 3).save(folder / f"{wnid}_0003.JPEG", quality=85, progressive=True)
    variant = index % 4
    if variant == 0:
        pic(400, 300, 4).convert("L").save(folder / f"{wnid}_0004.JPEG", quality=90)
        pic(300, 420, 5).convert("CMYK").save(folder / f"{wnid}_0005.JPEG", quality=90)
        (folder / f"{wnid}_0006.JPEG").write_bytes(b"")  # empty
    elif variant == 1:
        pic(360, 280, 4).convert("P", palette=Image.ADAPTIVE).save(folder / f"{wnid}_0004.png")
        rgba = pic(300, 300, 5).convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize((300, 300)))
        rgba.save(folder / f"{wnid}_0005.png")
        full = io.BytesIO()
        pic(400, 300, 6).save(full, format="JPEG", quality=90)
        (folder / f"{wnid}_0006.JPEG").write_bytes(full.getvalue()[: len(full.getvalue()) // 2])
    elif variant == 2:
        grey16 = (np.asarray(pic(300, 260, 4).convert("L"), np.uint16) * 257).astype(np.uint16)
        Image.fromarray(grey16).save(folder / f"{wnid}_0004.png")
        pic(330, 250, 5).save(folder / f"{wnid}_0005.JPEG", format="PNG")  # PNG behind .JPEG
        (folder / f"{wnid}_0006.JPEG").write_text("this is not an image\n")
        (folder / "README.txt").write_text("notes that live beside the images\n")
    else:
        pic(90, 60, 4).save(folder / f"{wnid}_0004.JPEG", quality=90)  # smaller than the crop
        pic(1600, 120, 5).save(folder / f"{wnid}_0005.JPEG", quality=90)  # panorama
        pic(300, 300, 6).save(folder / f"{wnid}_café_ñ_0006.JPEG", quality=90)  # non-ASCII
        (folder / f"{wnid}_0007.png").write_bytes(_png_with_declared_size(40000, 40000))


def generate_sample_dataset(root: str | os.PathLike) -> Path:
    """Create the sample dataset at ``root`` (idempotent; written aside and renamed into place)."""
    root = Path(root)
    if (root / MARKER).is_file():
        return root
    # Written aside and swapped in whole. Processes that load the definitions at the same time
    # may each generate it, so none deletes another's temporary folder.
    with atomic_dir(root, clean_leftovers=False) as tmp:
        for index, (wnid, colour) in enumerate(SAMPLE_CLASSES.items()):
            _write_class(tmp / wnid, wnid, colour, index)
        (tmp / MARKER).write_text(f"{SAMPLE_VERSION}\n")
    return root
