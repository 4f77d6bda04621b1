"""MDS writing in the published schema, the merged index, and reading it back with real readers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from streaming import StreamingDataset

from imagenet_int8_assets.core import mds, mds_index
from imagenet_int8_assets.core.quantize import dequantize
from imagenet_int8_assets.reader import LatentStreamingDataset, open_dataset


def _class_latents(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 32, 32), dtype=np.uint8)


@pytest.fixture()
def three_classes(tmp_path):
    root = tmp_path / "mds"
    data = {"n01440764": _class_latents(0, 5), "n01443537": _class_latents(1, 0), "n02676566": _class_latents(2, 7)}
    labels = {"n01440764": (0, "tench, Tinca tinca"), "n01443537": (1, "goldfish"), "n02676566": (402, "acoustic guitar")}
    for folder, arr in data.items():
        assert mds.write_class_shards(root / folder, arr, *labels[folder], {"seed": 0}) == len(arr)
    return root, data, labels


def test_class_index_has_the_published_schema(three_classes):
    root, data, _ = three_classes
    index = json.loads((root / "n02676566" / "index.json").read_text())
    shard = index["shards"][0]
    assert shard["column_names"] == ["label", "label_as_text", "vae_output"]
    assert shard["column_encodings"] == ["str", "str", "uint8"]
    assert shard["column_sizes"] == [None, None, None]
    assert shard["compression"] is None and shard["size_limit"] == 1 << 26
    assert shard["samples"] == 7
    # the empty class is a valid, empty index
    assert json.loads((root / "n01443537" / "index.json").read_text())["shards"] == []


def test_merged_index_reads_every_sample_once_in_class_order(three_classes):
    root, data, labels = three_classes
    summary = mds_index.merge_class_indexes(root, sorted(data))
    assert summary == {"samples": 12, "shards": 2, "per_class": {"n01440764": 5, "n01443537": 0, "n02676566": 7}}
    again = (root / "index.json").read_bytes()
    mds_index.merge_class_indexes(root, sorted(data))
    assert (root / "index.json").read_bytes() == again  # idempotent
    ds = StreamingDataset(local=str(root), batch_size=1, shuffle=False)
    assert ds.num_samples == 12
    expected = [(f, i) for f in sorted(data) for i in range(len(data[f]))]
    for n, (folder, i) in enumerate(expected):
        sample = ds[n]
        assert sample["label"] == str(labels[folder][0])
        assert sample["label_as_text"] == labels[folder][1]
        np.testing.assert_array_equal(sample["vae_output"], dequantize(data[folder][i].ravel()))


def test_builtin_uint8_encoding_would_silently_read_one_byte(three_classes):
    """Why registration matters: streaming's own 'uint8' is a 1-byte scalar."""
    from streaming.base.format.mds.encodings import UInt8, _encodings

    root, data, _ = three_classes
    saved = _encodings["uint8"]
    try:
        _encodings["uint8"] = UInt8
        ds = StreamingDataset(local=str(root / "n01440764"), batch_size=1, shuffle=False)
        assert np.asarray(ds[0]["vae_output"]).size == 1
    finally:
        _encodings["uint8"] = saved
    assert open_dataset(root / "n01440764")[0]["latent"].shape == (4, 32, 32)


def test_reader_helper_works_in_spawned_dataloader_workers(three_classes):
    import torch

    root, data, labels = three_classes
    mds_index.merge_class_indexes(root, sorted(data))
    ds = open_dataset(root, shuffle=False)
    assert isinstance(ds, LatentStreamingDataset)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    latents, label_ids = [], []
    for batch in loader:
        assert batch["latent"].shape[1:] == (4, 32, 32) and batch["latent"].dtype == torch.float32
        latents.append(batch["latent"])
        label_ids += batch["label"].tolist()
    assert sorted(label_ids) == sorted([0] * 5 + [402] * 7)
    assert float(torch.cat(latents).abs().max()) <= 12.0


def test_rewriting_a_class_replaces_it_atomically(three_classes):
    root, data, labels = three_classes
    mds.write_class_shards(root / "n01440764", _class_latents(9, 2), *labels["n01440764"], {"seed": 1})
    assert mds_index.index_sample_count(mds_index.read_index(root / "n01440764")) == 2
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="do not match"):
        mds.write_class_shards(root / "x", np.zeros((2, 4, 32, 32), np.uint8), 0, "x", {}, flips_u8=np.zeros((1, 4, 32, 32), np.uint8))
    assert not (root / "x").exists()


def test_inconsistent_builds_are_named():
    a = {"vae": {"requested": "stabilityai/sdxl-vae"}, "crops": {"recipe": "imagenet.int8", "size": 256}, "seed": 0, "latent_value": "sample", "quant_range": 12.0}
    b = {**a, "crops": {"recipe": "adm", "size": 256}}
    assert mds_index.inconsistent_classes({"x": a, "y": a}) == []
    lines = mds_index.inconsistent_classes({"x": a, "y": a, "z": b})
    assert len(lines) == 2 and "[z]" in lines[1] and "crops.recipe=adm" in lines[1]


@pytest.mark.parametrize(
    "shape, value_range",
    [((16, 32, 32), 8.0), ((4, 64, 64), 12.0), ((4, 32, 32), 8.58)],
)
def test_other_layouts_use_the_builtin_ndarray_encoding_and_read_back(tmp_path, shape, value_range):
    root = tmp_path / "mds"
    codes = np.random.default_rng(3).integers(0, 256, (3, *shape), dtype=np.uint8)
    flips = codes[..., ::-1].copy()
    mds.write_class_shards(root / "c", codes, 5, "five", {"seed": 0}, value_range=value_range, flips_u8=flips)
    encoding = "ndarray:uint8:" + ",".join(map(str, shape))
    shard = mds_index.read_index(root / "c")["shards"][0]
    assert dict(zip(shard["column_names"], shard["column_encodings"])) == {
        "label": "str", "label_as_text": "str", "vae_output": encoding, "vae_output_flip": encoding
    }
    info = json.loads((root / "c" / "build.json").read_text())
    assert info["latent_shape"] == list(shape) and info["dequantize"] == f"z = (u / 255 - 0.5) * {2 * value_range:g}"
    mds_index.merge_class_indexes(root, ["c"])
    mds_index.write_dataset_info(root, info, {"samples": 3, "per_class": {"c": 3}})
    ds = open_dataset(root)
    for i in range(3):
        sample = ds[i]
        assert sample["latent"].shape == shape and sample["label"] == 5
        np.testing.assert_allclose(sample["latent"], dequantize(codes[i], value_range), atol=1e-6)
        np.testing.assert_allclose(sample["latent_flip"], dequantize(flips[i], value_range), atol=1e-6)
    # a plain StreamingDataset needs no registration for these columns
    plain = StreamingDataset(local=str(root), batch_size=1, shuffle=False)
    np.testing.assert_array_equal(plain[0]["vae_output"], codes[0])
