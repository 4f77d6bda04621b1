"""Crop recipes: pixel-exact against independent implementations of the published algorithms."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.core.source.images import ImageRejected, normalize_mode, open_image
import pickle

from imagenet_int8_assets.core.common.parallel import MIN_ITEMS_FOR_POOL, map_ordered
from imagenet_int8_assets.core.crops.preprocess import (
    CropError,
    CropTask,
    crop_adm,
    crop_file,
    crop_image,
    crop_imagenet_int8,
    crop_task,
    crop_tasks,
)
from imagenet_int8_assets.sample import synthetic_picture


def published_imagenet_int8(img: Image.Image) -> np.ndarray:
    """The published build, written out literally (REFERENCE s1)."""
    w, h = img.size
    if w < h:
        img = img.resize((256, int(h * 256 / w)), Image.BICUBIC)
    else:
        img = img.resize((int(w * 256 / h), 256), Image.BICUBIC)
    w, h = img.size
    img = img.crop(((w - 256) / 2, (h - 256) / 2, (w + 256) / 2, (h + 256) / 2))
    return np.asarray(img.convert("RGB"))


def guided_diffusion_center_crop(img: Image.Image) -> np.ndarray:
    """guided-diffusion's center_crop_arr, written out literally (ADM)."""
    img = img.convert("RGB")
    while min(*img.size) >= 2 * 256:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = 256 / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)
    crop_y = (arr.shape[0] - 256) // 2
    crop_x = (arr.shape[1] - 256) // 2
    return arr[crop_y : crop_y + 256, crop_x : crop_x + 256]


SIZES = [(500, 375), (375, 500), (500, 333), (257, 1000), (1024, 768), (2000, 1500), (256, 256), (300, 301), (90, 60), (999, 511)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_imagenet_int8_recipe_is_pixel_identical_to_published(size, mode):
    img = synthetic_picture(*size, (180, 90, 30), seed=size[0] + size[1]).convert(mode)
    ours = crop_image(img, "imagenet.int8")
    assert ours.shape == (256, 256, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, published_imagenet_int8(img))


@pytest.mark.parametrize("size", SIZES)
def test_adm_recipe_is_pixel_identical_to_guided_diffusion(size):
    img = synthetic_picture(*size, (30, 90, 180), seed=size[0] * 3 + size[1])
    np.testing.assert_array_equal(crop_image(img, "adm"), guided_diffusion_center_crop(img))


def test_recipes_differ_on_large_images():
    img = synthetic_picture(1600, 1200, (30, 160, 60), seed=5)
    assert not np.array_equal(crop_adm(img), crop_imagenet_int8(img))


@pytest.mark.parametrize("recipe", ["imagenet.int8", "adm"])
def test_extreme_aspect_ratio_is_bounded_and_close_to_full_resize(recipe):
    # 4000x30 would need a 34133x256 intermediate (8.7 MP): the bounded path is taken.
    img = synthetic_picture(4000, 30, (200, 200, 20), seed=1)
    out = crop_image(img, recipe)
    assert out.shape == (256, 256, 3)
    reference = published_imagenet_int8(img) if recipe == "imagenet.int8" else guided_diffusion_center_crop(img)
    # same region, resampled directly: equal up to interpolation rounding
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 2.0
    # a 1 x 100000 strip cannot even be resized the normal way (25.6 GP); ours stays small
    strip = Image.new("RGB", (100000, 1), (10, 20, 30))
    assert crop_image(strip, recipe).shape == (256, 256, 3)


def test_odd_modes_become_sensible_rgb():
    base = synthetic_picture(300, 200, (120, 60, 200), seed=3)
    rgba = base.convert("RGBA")
    rgba.putalpha(0)  # fully transparent -> white, not whatever colour is stored
    assert (crop_image(rgba) == 255).all()
    grey16 = Image.fromarray((np.asarray(base.convert("L"), np.uint16) * 257).astype(np.uint16))
    assert grey16.mode.startswith("I")
    np.testing.assert_array_equal(normalize_mode(grey16), np.asarray(base.convert("L")))
    palette = base.convert("P", palette=Image.ADAPTIVE)
    assert np.abs(crop_image(palette).astype(int) - crop_image(palette.convert("RGB")).astype(int)).max() == 0
    for mode in ("1", "LA", "PA", "YCbCr", "I", "F"):
        assert crop_image(base.convert(mode)).shape == (256, 256, 3), mode


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_crop_file_handles_real_files(tmp_path):
    pic = synthetic_picture(400, 300, (200, 100, 0), seed=9)
    progressive = _save(pic, tmp_path / "p.jpg", quality=90, progressive=True)
    png_as_jpeg = _save(pic, tmp_path / "png.JPEG", format="PNG")
    unicode_name = _save(pic, tmp_path / "café_ñ.JPEG", quality=90)
    for path in (progressive, png_as_jpeg, unicode_name):
        with Image.open(path) as img:
            np.testing.assert_array_equal(crop_file(path), published_imagenet_int8(img))


def test_crop_file_reports_bad_files_with_their_name(tmp_path):
    buf = io.BytesIO()
    synthetic_picture(400, 300, (1, 2, 3), seed=1).save(buf, format="JPEG")
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(buf.getvalue()[:2000])
    text = tmp_path / "text.JPEG"
    text.write_text("hello")
    for path in (truncated, text):
        with pytest.raises(CropError, match=path.name):
            crop_file(path)
    big = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(big)
    with pytest.raises(CropError, match="exceeds the limit"):
        crop_file(big, max_pixels=1000)


def test_open_image_refuses_by_declared_size_before_decoding(tmp_path):
    from imagenet_int8_assets.sample import _png_with_declared_size

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_declared_size(50000, 50000))
    with pytest.raises(ImageRejected, match="50000x50000"):
        open_image(bomb)


def test_crop_tasks_are_named_picklable_and_cross_a_process_pool(tmp_path):
    pic = synthetic_picture(400, 300, (200, 100, 0), seed=9)
    (tmp_path / "a").mkdir()
    _save(pic, tmp_path / "a" / "good.JPEG", quality=90)
    (tmp_path / "a" / "bad.JPEG").write_text("hello")
    ids = ["a/good.JPEG", "a/bad.JPEG"] * max(1, MIN_ITEMS_FOR_POOL // 2)
    tasks = crop_tasks(tmp_path, ids, "adm", 256, 10**8)
    assert tasks[0] == CropTask(str(tmp_path / "a" / "good.JPEG"), "adm", 256, 10**8)
    assert [t.path for t in tasks] == [str(tmp_path / i) for i in ids] and tasks[1].size == 256
    assert pickle.loads(pickle.dumps(tasks[0])) == tasks[0]
    # absolute ids are kept as they are
    assert crop_tasks("", [str(tmp_path / "a" / "good.JPEG")], "adm", 256, 10**8)[0].path == tasks[0].path
    pooled = list(map_ordered(crop_task, tasks, 2, chunksize=8))  # spawned workers: the tasks are pickled
    with Image.open(tmp_path / "a" / "good.JPEG") as img:
        expected = guided_diffusion_center_crop(img)
    for (arr, reason), task in zip(pooled, tasks, strict=True):
        if task.path.endswith("good.JPEG"):
            assert reason == ""
            np.testing.assert_array_equal(arr, expected)
        else:
            assert arr is None and "bad.JPEG" in reason
