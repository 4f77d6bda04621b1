"""MDS writing in the published schema, the merged index, and reading it back with real readers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.dataset.mds import open_streaming
from imagenet_int8_assets.core.latents.quantize import dequantize
from imagenet_int8_assets.reader import LatentStreamingDataset, open_dataset


def _class_latents(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 4, 32, 32), dtype=np.uint8)


@pytest.fixture()
def three_classes(tmp_path):
    root = tmp_path / "mds"
    data = {"n01440764": _class_latents(0, 5), "n01443537": _class_latents(1, 0), "n02676566": _class_latents(2, 7)}
    labels = {"n01440764": (0, "tench, Tinca tinca"), "n01443537": (1, "goldfish"), "n02676566": (402, "acoustic guitar")}
    for folder, arr in data.items():
        version = mds.write_class_shards(root, folder, arr, *labels[folder], {"seed": 0})
        assert mds_index.index_sample_count(mds_index.read_index(version)) == len(arr)
        assert version == mds_index.current_version_dir(root, folder)
    return root, data, labels


def _publish(root, classes):
    index, summary = mds_index.merged_index(root, classes)
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, classes[0]), summary))
    return summary


def test_class_index_has_the_published_schema(three_classes):
    root, data, _ = three_classes
    index = mds_index.read_class_index(root, "n02676566")
    shard = index["shards"][0]
    assert shard["column_names"] == ["label", "label_as_text", "vae_output"]
    assert shard["column_encodings"] == ["str", "str", "uint8"]
    assert shard["column_sizes"] == [None, None, None]
    assert shard["compression"] is None and shard["size_limit"] == 1 << 26
    assert shard["samples"] == 7
    # the empty class is a valid, empty index
    assert mds_index.read_class_index(root, "n01443537")["shards"] == []


def test_merged_index_reads_every_sample_once_in_class_order(three_classes):
    root, data, labels = three_classes
    summary = _publish(root, sorted(data))
    assert {k: summary[k] for k in ("samples", "shards", "per_class")} == {
        "samples": 12, "shards": 2, "per_class": {"n01440764": 5, "n01443537": 0, "n02676566": 7}
    }
    again = (root / "index.json").read_bytes()
    _publish(root, sorted(data))
    assert (root / "index.json").read_bytes() == again  # idempotent
    assert json.loads(again)["imagenet_int8"]["per_class"] == summary["per_class"]
    ds = open_streaming(local=str(root), batch_size=1, shuffle=False)
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
        ds = open_streaming(local=str(mds_index.current_version_dir(root, "n01440764")), batch_size=1, shuffle=False)
        assert np.asarray(ds[0]["vae_output"]).size == 1
    finally:
        _encodings["uint8"] = saved
    assert open_dataset(mds_index.current_version_dir(root, "n01440764"))[0]["latent"].shape == (4, 32, 32)


@pytest.mark.slow
def test_reader_helper_works_in_spawned_dataloader_workers(three_classes):
    import torch

    root, data, labels = three_classes
    _publish(root, sorted(data))
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


def test_rewriting_a_class_adds_a_version_and_leaves_the_published_dataset_alone(three_classes):
    root, data, labels = three_classes
    _publish(root, sorted(data))
    published = (root / "index.json").read_bytes()
    old_version = mds_index.current_version_dir(root, "n01440764")
    new_version = mds.write_class_shards(root, "n01440764", _class_latents(9, 2), *labels["n01440764"], {"seed": 1})
    assert new_version != old_version and old_version.is_dir()
    assert mds_index.index_sample_count(mds_index.read_class_index(root, "n01440764")) == 2
    assert (root / "index.json").read_bytes() == published  # readers still see the old dataset
    assert open_dataset(root).num_samples == 12
    # the same content again is the same version (nothing added)
    again = mds.write_class_shards(root, "n01440764", _class_latents(9, 2), *labels["n01440764"], {"seed": 1})
    assert again == new_version
    # garbage collection keeps what the published index and the current pointers name
    assert mds_index.collect_garbage(root) == []
    _publish(root, sorted(data))
    assert open_dataset(root).num_samples == 9
    assert old_version.is_dir()  # named by the previously published index: readers may still hold it
    _publish(root, sorted(data))
    assert mds_index.collect_garbage(root) == []  # same content published twice: previous == current
    third = mds.write_class_shards(root, "n01440764", _class_latents(10, 3), *labels["n01440764"], {"seed": 2})
    _publish(root, sorted(data))
    removed = mds_index.collect_garbage(root)
    assert not old_version.exists() and removed == [old_version.relative_to(root).as_posix()]
    assert new_version.is_dir() and third.is_dir()
    assert not [p for p in mds_index.class_home(root, "n01440764").iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="do not match"):
        mds.write_class_shards(root, "x", np.zeros((2, 4, 32, 32), np.uint8), 0, "x", {}, flips_u8=np.zeros((1, 4, 32, 32), np.uint8))
    assert not mds_index.class_home(root, "x").exists()


def test_class_names_map_to_safe_folder_names(tmp_path):
    from imagenet_int8_assets.core.common.layout import class_dir_name

    plain = ["n01440764", "airplane", "index.json", "a b", "c-1_2.x"]
    assert [class_dir_name(n) for n in plain] == plain
    odd = ["../../x", "/etc", ".hidden", "50%", "a/b", "x" * 300, "caf\u00e9", "bad\udcff", "-x", "dot."]
    names = [class_dir_name(n) for n in odd]
    assert len(set(names) | set(plain)) == len(names) + len(plain)  # no collisions
    for n in names:
        assert "/" not in n and not n.startswith(".") and "%" in n and len(n) <= 120 and n.isascii()
        (tmp_path / n).mkdir()  # a valid single path component on this filesystem
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


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
    mds.write_class_shards(root, "c", codes, 5, "five", {"seed": 0}, value_range=value_range, flips_u8=flips)
    encoding = "ndarray:uint8:" + ",".join(map(str, shape))
    shard = mds_index.read_class_index(root, "c")["shards"][0]
    assert dict(zip(shard["column_names"], shard["column_encodings"])) == {
        "label": "str", "label_as_text": "str", "vae_output": encoding, "vae_output_flip": encoding
    }
    info = mds_index.read_class_build_info(root, "c")
    assert info["latent_shape"] == list(shape) and info["dequantize"] == f"z = (u / 255 - 0.5) * {2 * value_range:g}"
    _publish(root, ["c"])
    ds = open_dataset(root)
    for i in range(3):
        sample = ds[i]
        assert sample["latent"].shape == shape and sample["label"] == 5
        np.testing.assert_allclose(sample["latent"], dequantize(codes[i], value_range), atol=1e-6)
        np.testing.assert_allclose(sample["latent_flip"], dequantize(flips[i], value_range), atol=1e-6)
    # a plain StreamingDataset needs no registration for these columns
    plain = open_streaming(local=str(root), batch_size=1, shuffle=False)
    np.testing.assert_array_equal(plain[0]["vae_output"], codes[0])


def test_opening_a_dataset_survives_another_process_taking_the_same_shared_memory_prefix(tmp_path, monkeypatch):
    """Two processes that open datasets at the same moment can pick the same free prefix; the later
    one's ``NNNNNN_locals`` then exists already. Played here by handing out, once, a prefix whose
    segment another process has just created (the race cannot be timed from one process)."""
    import os
    from multiprocessing import resource_tracker, shared_memory

    import streaming.base.shared.prefix as prefix
    from streaming import StreamingDataset

    root = tmp_path / "mds"
    mds.write_class_shards(root, "a", np.zeros((2, 4, 4, 4), np.uint8), 0, "a", {"seed": 0})
    folder = mds_index.current_version_dir(root, "a")
    taken = 900000 + os.getpid() % 90000
    theirs = shared_memory.SharedMemory(name=f"{taken:06}_locals", create=True, size=16)
    resource_tracker.unregister(theirs._name, "shared_memory")
    real, handed = prefix._check_and_find_retrying, []

    def racing(streams_local, streams_remote, shm_name, retry):
        if len(handed) < len(prefix.SHM_TO_CLEAN):  # the first registration looks: the taken prefix
            handed.append(shm_name)
            return taken
        return real(streams_local, streams_remote, shm_name, retry)

    monkeypatch.setattr(prefix, "_check_and_find_retrying", racing)
    try:
        with pytest.raises(FileExistsError, match="_locals"):  # what a plain StreamingDataset does
            StreamingDataset(local=str(folder), batch_size=1, shuffle=False)
        handed.clear()
        dataset = open_streaming(local=str(folder), batch_size=1, shuffle=False)
        assert dataset.num_samples == 2 and dataset._shm_prefix_int != taken
        del dataset
    finally:
        theirs.close()
        theirs.unlink()
