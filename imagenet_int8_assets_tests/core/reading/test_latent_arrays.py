"""load_latents: whole datasets as numpy arrays, equal sample for sample to a real StreamingDataset.

Every dataset here is written by the project's own writer (``mds.write_class_shards`` and
``mds_index.swap_in_index``) or, for the published Imagenet.int8 layout, by ``streaming.MDSWriter``; each
is read back both ways: ``load_latents`` and ``open_dataset`` (a real ``StreamingDataset``).
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.latents.aura_latents import hflip_latent
from imagenet_int8_assets.core.reading.latent_arrays import load_latents
from imagenet_int8_assets.core.latents.quantize import dequantize
from imagenet_int8_assets.reader import DatasetDamaged, open_dataset

# label, text, samples: texts (and labels) of different lengths, so sample sizes differ by class
CLASSES = {
    "n01440764": (0, "tench, Tinca tinca", 7),
    "n01443537": (1, "goldfish", 0),
    "n02676566": (402, "acoustic guitar", 5),
    "n09999999": (999, "a much longer label text, with a comma and ünïcödé", 4),
}
AURA_INFO = {"vae": {"family": "aura", "requested": "aura-tiny-random", "repo_id": None}, "seed": 0}
SDXL_INFO = {"vae": {"family": "autoencoder-kl", "requested": "tiny-random", "repo_id": None}, "seed": 0}


def _codes(seed: int, n: int, shape=(4, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _build(root, monkeypatch, shape=(4, 32, 32), value_range=12.0, flips=False, info=SDXL_INFO, per_shard=3):
    """Write CLASSES with the project's writer, ``per_shard`` samples per shard, and publish them."""
    bytes_per_sample = int(np.prod(shape)) * (2 if flips else 1) + 100
    monkeypatch.setattr(mds, "SIZE_LIMIT", per_shard * bytes_per_sample)
    data = {}
    for seed, (name, (label, text, n)) in enumerate(CLASSES.items()):
        codes = _codes(seed, n, shape)
        flipped = _codes(100 + seed, n, shape) if flips else None
        mds.write_class_shards(root, name, codes, label, text, info, value_range=value_range, flips_u8=flipped)
        data[name] = (codes, flipped)
    index, summary = mds_index.merged_index(root, list(CLASSES))
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, next(iter(CLASSES))), summary))
    return data


def _assert_matches_streaming(arrays, root):
    """Every sample of ``arrays`` equals what a real StreamingDataset (open_dataset) returns."""
    with warnings.catch_warnings():  # a dataset without hashes: open_dataset says so (tested elsewhere)
        warnings.simplefilter("ignore", UserWarning)
        ds = open_dataset(root, shuffle=False)
    assert ds.num_samples == len(arrays) == arrays.codes.shape[0] == arrays.labels.shape[0]
    for i in range(ds.num_samples):
        sample = ds[i]
        np.testing.assert_array_equal(arrays.latents(i), sample["latent"])
        assert arrays.latents(i).dtype == sample["latent"].dtype == np.float32
        assert int(arrays.labels[i]) == sample["label"]
        assert arrays.label_texts[int(arrays.labels[i])] == sample["label_as_text"]
        if "latent_flip" in sample:
            np.testing.assert_array_equal(arrays.latents(i, flip=True), sample["latent_flip"])
        else:
            assert arrays.codes_flip is None


def test_published_schema_dataset_loads_like_streaming_reader(tmp_path, monkeypatch):
    root = tmp_path / "mds"
    data = _build(root, monkeypatch)
    index = json.loads((root / "index.json").read_text())
    per_class = {}
    for shard in index["shards"]:
        per_class.setdefault(shard["raw_data"]["basename"].split("/")[1], []).append(shard["samples"])
    assert sorted(per_class) == ["n01440764", "n02676566", "n09999999"]  # none for the empty class
    assert all(len(counts) > 1 for counts in per_class.values())  # several shards per class
    assert index["shards"][0]["column_encodings"] == ["str", "str", "uint8"]

    arrays = load_latents(root)
    _assert_matches_streaming(arrays, root)
    assert arrays.codes.dtype == np.uint8 and arrays.codes.shape == (16, 4, 32, 32)
    assert arrays.labels.dtype == np.int64
    expected = np.concatenate([data[name][0] for name in CLASSES])
    np.testing.assert_array_equal(arrays.codes, expected)  # the bytes that were written, in order
    assert arrays.labels.tolist() == [label for label, _, n in CLASSES.values() for _ in range(n)]
    assert arrays.label_texts == {0: "tench, Tinca tinca", 402: "acoustic guitar",
                                  999: "a much longer label text, with a comma and ünïcödé"}
    assert (arrays.latent_shape, arrays.value_range, arrays.formula) == ((4, 32, 32), 12.0, "z = (u / 255 - 0.5) * 24")
    assert (arrays.vae_family, arrays.vae_name) == ("autoencoder-kl", "tiny-random")
    assert arrays.codes_flip is None and arrays.verified == f"existence and size of {len(index['shards'])} shard(s)"
    bounds = np.cumsum([0] + [s["samples"] for s in index["shards"]]).tolist()
    assert [(s.start, s.stop) for s in arrays.shards] == list(zip(bounds[:-1], bounds[1:]))
    # one thread or several: the same arrays; a class version folder loads on its own
    single = load_latents(root, verify="hash", threads=1)
    np.testing.assert_array_equal(single.codes, arrays.codes)
    np.testing.assert_array_equal(single.labels, arrays.labels)
    version = mds_index.current_version_dir(root, "n02676566")
    one_class = load_latents(version)
    np.testing.assert_array_equal(one_class.codes, data["n02676566"][0])
    assert one_class.label_texts == {402: "acoustic guitar"} and set(one_class.labels.tolist()) == {402}
    _assert_matches_streaming(one_class, version)


def test_16_channel_ndarray_dataset_with_stored_flips(tmp_path, monkeypatch):
    root = tmp_path / "mds"
    data = _build(root, monkeypatch, shape=(16, 32, 32), value_range=8.0, flips=True, info=AURA_INFO, per_shard=2)
    shard = json.loads((root / "index.json").read_text())["shards"][0]
    assert shard["column_encodings"] == ["str", "str", "ndarray:uint8:16,32,32", "ndarray:uint8:16,32,32"]
    assert shard["column_names"][-1] == "vae_output_flip"

    arrays = load_latents(root)
    _assert_matches_streaming(arrays, root)
    np.testing.assert_array_equal(arrays.codes, np.concatenate([data[n][0] for n in CLASSES]))
    np.testing.assert_array_equal(arrays.codes_flip, np.concatenate([data[n][1] for n in CLASSES]))
    assert (arrays.latent_shape, arrays.value_range, arrays.formula) == ((16, 32, 32), 8.0, "z = (u / 255 - 0.5) * 16")
    assert arrays.vae_family == "aura"
    without = load_latents(root, flips=False)
    assert without.codes_flip is None
    np.testing.assert_array_equal(without.codes, arrays.codes)


def _published_style(root, samples: int = 40, per_shard_bytes: int = 30_000):
    """A dataset as the published Imagenet.int8 is: MDSWriter with the registered 'uint8' encoding,
    flat shard names, no hashes, no build record, classes mixed within shards (sizes differ)."""
    from streaming import MDSWriter

    mds.register_uint8_encoding()
    rng = np.random.default_rng(7)
    table = {0: "tench", 402: "acoustic guitar", 88: "macaw", 1: "goldfish, Carassius auratus"}
    labels = rng.choice(sorted(table), samples)
    codes = _codes(8, samples)
    columns = {"vae_output": "uint8", "label": "str", "label_as_text": "str"}
    with MDSWriter(out=str(root), columns=columns, compression=None, size_limit=per_shard_bytes) as out:
        for code, label in zip(codes, labels):
            out.write({"vae_output": code, "label": str(label), "label_as_text": table[int(label)]})
    return codes, labels, table


def test_published_dataset_without_record_loads_with_published_defaults(tmp_path):
    root = tmp_path / "imagenet.int8"
    codes, labels, table = _published_style(root)
    index = json.loads((root / "index.json").read_text())
    assert len(index["shards"]) > 1 and "imagenet_int8" not in index and not (root / "build.json").exists()
    with pytest.warns(UserWarning, match="verified their sizes only"):
        arrays = load_latents(root, verify="hash")
    _assert_matches_streaming(arrays, root)
    np.testing.assert_array_equal(arrays.codes, codes)
    np.testing.assert_array_equal(arrays.labels, labels)
    assert arrays.label_texts == {k: v for k, v in sorted(table.items()) if k in set(labels.tolist())}
    assert arrays.record is None
    assert (arrays.latent_shape, arrays.value_range) == ((4, 32, 32), 12.0)
    assert (arrays.vae_family, arrays.vae_name) == ("autoencoder-kl", "stabilityai/sdxl-vae")
    np.testing.assert_array_equal(arrays.latents(slice(0, 3)), dequantize(codes[:3], 12.0))


def test_compressed_shards_are_read(tmp_path):
    from streaming import MDSWriter

    mds.register_uint8_encoding()
    codes = _codes(3, 9)
    with MDSWriter(out=str(tmp_path / "z"), columns={"vae_output": "uint8", "label": "str", "label_as_text": "str"},
                   compression="zstd:3", size_limit=20_000) as out:
        for code in codes:
            out.write({"vae_output": code, "label": "5", "label_as_text": "five"})
    assert not list((tmp_path / "z").glob("*.mds"))  # only the .mds.zstd files
    arrays = load_latents(tmp_path / "z")
    np.testing.assert_array_equal(arrays.codes, codes)
    assert arrays.labels.tolist() == [5] * 9 and arrays.label_texts == {5: "five"}

    # the count a compressed shard starts with is read from its decompressed bytes
    index = json.loads((tmp_path / "z" / "index.json").read_text())
    n = index["shards"][0]["samples"]
    index["shards"][0]["samples"] = 10_000_000
    (tmp_path / "z" / "index.json").write_text(json.dumps(index))
    for verify in ("size", "none"):
        with pytest.raises(DatasetDamaged, match=rf"shard.00000.mds.zstd holds {n} samples .* says 10,000,000"):
            load_latents(tmp_path / "z", verify=verify)


def _first_shard(root):
    index = json.loads((root / "index.json").read_text())
    return root / index["shards"][0]["raw_data"]["basename"]


def test_damaged_datasets_raise_dataset_damaged(tmp_path, monkeypatch):
    root = tmp_path / "mds"
    _build(root, monkeypatch)
    shard = _first_shard(root)
    good = shard.read_bytes()

    shard.write_bytes(good[:-10])  # truncated: caught by the size check before reading
    with pytest.raises(DatasetDamaged, match=r"is truncated .*To repair: rebuild class 'n01440764'"):
        load_latents(root)
    # the same damage with verification off is still caught by the reader itself
    with pytest.raises(DatasetDamaged, match=r"has [\d,]+ bytes, index.json records"):
        load_latents(root, verify="none")

    # a sample's column-size header changed (same file size): only the reader can see it
    offsets = np.frombuffer(good[4:20], np.uint32)
    bad = bytearray(good)
    bad[int(offsets[1]) + 8 : int(offsets[1]) + 12] = np.uint32(4000).tobytes()  # vae_output size of sample 1
    shard.write_bytes(bytes(bad))
    with pytest.raises(DatasetDamaged, match=r"column sizes that do not add up .*To repair: rebuild class 'n01440764'"):
        load_latents(root, verify="size")
    with pytest.raises(DatasetDamaged, match="has changed bytes"):
        load_latents(root, verify="hash")

    bad = bytearray(good)
    bad[0:4] = np.uint32(99).tobytes()  # the sample count: checked against the index before reading, in every mode
    shard.write_bytes(bytes(bad))
    for verify in ("size", "none"):
        with pytest.raises(DatasetDamaged, match=r"holds 99 samples \(the count it starts with\), index.json says \d"):
            load_latents(root, verify=verify)

    shard.unlink()
    with pytest.raises(DatasetDamaged, match="is missing"):
        load_latents(root)
    with pytest.raises(FileNotFoundError, match="No dataset at"):
        load_latents(tmp_path / "nowhere")


def test_builtin_one_byte_uint8_column_is_refused_not_misread(tmp_path):
    """Written while streaming's own 1-byte 'uint8' was registered: not 4096-byte latents."""
    from streaming import MDSWriter
    from streaming.base.format.mds.encodings import UInt8, _encodings

    saved = _encodings["uint8"]
    try:
        _encodings["uint8"] = UInt8
        with MDSWriter(out=str(tmp_path / "d"), columns={"vae_output": "uint8", "label": "str"}, compression=None) as out:
            for i in range(3):
                out.write({"vae_output": np.uint8(i), "label": "1"})
    finally:
        _encodings["uint8"] = saved
    with pytest.raises(DatasetDamaged, match=r"stores 1 bytes of 'vae_output' .* where the latent shape needs 4096"):
        load_latents(tmp_path / "d")


def test_labels_that_are_not_indices_are_refused(tmp_path):
    from streaming import MDSWriter

    mds.register_uint8_encoding()
    with MDSWriter(out=str(tmp_path / "d"), columns={"vae_output": "uint8", "label": "str"}, compression=None) as out:
        out.write({"vae_output": _codes(0, 1)[0], "label": "12"})
        out.write({"vae_output": _codes(1, 1)[0], "label": "n01440764"})
    with pytest.raises(ValueError, match=r"sample 1 has the label 'n01440764'; expected a label index"):
        load_latents(tmp_path / "d")


def test_one_text_per_label_is_checked(tmp_path):
    from streaming import MDSWriter

    mds.register_uint8_encoding()
    columns = {"vae_output": "uint8", "label": "str", "label_as_text": "str"}
    with MDSWriter(out=str(tmp_path / "d"), columns=columns, compression=None) as out:
        for text in ("tench", "tench", "tenxh"):
            out.write({"vae_output": _codes(0, 1)[0], "label": "3", "label_as_text": text})
    with pytest.raises(ValueError, match="samples with label 3 have different texts"):
        load_latents(tmp_path / "d")


# --------------------------------------------------------------------------------------------
# torch helpers


def test_decode_codes_equals_the_numpy_decoder():
    import torch

    from imagenet_int8_assets.core.reading.latent_torch import decode_codes

    codes = np.arange(256, dtype=np.uint8).reshape(1, 4, 8, 8)
    for value_range in (12.0, 8.0, 3.37):
        z = decode_codes(codes, value_range, "cpu")
        assert z.dtype == torch.float32 and z.device.type == "cpu" and tuple(z.shape) == (1, 4, 8, 8)
        np.testing.assert_array_equal(z.numpy(), dequantize(codes, value_range))
    with pytest.raises(TypeError, match="needs uint8"):
        decode_codes(codes.astype(np.int16), 12.0, "cpu")


def test_flip_augmentation_aura_stored_and_refused(tmp_path, monkeypatch):
    import torch

    from imagenet_int8_assets.core.reading.latent_torch import FlipUnsupported, batch

    # AuraEquiVAE latents: flipped in latent space (width flipped, channels [-4:-2] negated)
    aura = load_latents(_write_one(tmp_path / "aura", AURA_INFO, (16, 8, 8), 8.0, flips=False))
    z, labels = batch(aura, slice(0, 6), device="cpu", hflip=0.5, generator=torch.Generator().manual_seed(1))
    flip = torch.rand(6, generator=torch.Generator().manual_seed(1)) < 0.5
    assert 0 < int(flip.sum()) < 6
    plain = dequantize(aura.codes[:6], 8.0)
    expected = np.where(flip.numpy()[:, None, None, None], hflip_latent(plain), plain)
    np.testing.assert_array_equal(z.numpy(), expected)
    assert labels.tolist() == aura.labels[:6].tolist()

    # stored flips: the stored flipped latent is picked
    stored = load_latents(_write_one(tmp_path / "stored", SDXL_INFO, (4, 8, 8), 12.0, flips=True))
    z, _ = batch(stored, [0, 2, 4, 5], device="cpu", hflip=1.0)
    np.testing.assert_array_equal(z.numpy(), dequantize(stored.codes_flip[[0, 2, 4, 5]], 12.0))
    z, _ = batch(stored, [0, 2], device="cpu")  # no augmentation asked: the plain latents
    np.testing.assert_array_equal(z.numpy(), dequantize(stored.codes[[0, 2]], 12.0))

    # an SDXL-style latent without stored flips is not flip-equivariant: refused
    plain_sdxl = load_latents(_write_one(tmp_path / "sdxl", SDXL_INFO, (4, 8, 8), 12.0, flips=False))
    with pytest.raises(FlipUnsupported, match="not flip-equivariant .* IMAGENET_INT8_STORE_FLIP=true"):
        batch(plain_sdxl, slice(0, 2), device="cpu", hflip=0.5)
    z, _ = batch(plain_sdxl, slice(0, 2), device="cpu")
    np.testing.assert_array_equal(z.numpy(), dequantize(plain_sdxl.codes[:2], 12.0))


def _write_one(root, info, shape, value_range, flips):
    n = 6
    mds.write_class_shards(root, "c", _codes(1, n, shape), 3, "three", info, value_range=value_range,
                           flips_u8=_codes(2, n, shape) if flips else None)
    return mds_index.current_version_dir(root, "c")


# --------------------------------------------------------------------------------------------
# Hugging Face Hub


def test_load_from_a_hub_dataset_repo_and_from_the_offline_cache(tmp_path, monkeypatch, fake_hub):
    from huggingface_hub import constants

    root = tmp_path / "mds"
    _build(root, monkeypatch)
    local = load_latents(root)
    files = {INDEX: (root / INDEX).read_bytes(), "build.json": (root / "build.json").read_bytes()}
    for shard in json.loads(files[INDEX])["shards"]:
        files[shard["raw_data"]["basename"]] = (root / shard["raw_data"]["basename"]).read_bytes()
    files["classes/n01440764/current.json"] = b"{}"  # a file a reader does not need: not downloaded
    fake_hub.create_repo("someone/imagenet.int8")
    first = fake_hub.commit_files("someone/imagenet.int8", files)

    arrays = load_latents("someone/imagenet.int8")
    np.testing.assert_array_equal(arrays.codes, local.codes)
    np.testing.assert_array_equal(arrays.labels, local.labels)
    assert arrays.label_texts == local.label_texts and arrays.source == "Hub dataset someone/imagenet.int8"
    assert arrays.root.name == first  # the snapshot of the commit that was read
    assert not (arrays.root / "classes/n01440764/current.json").exists()

    # a new commit changes the data; revision= still reads the first one
    shutil.rmtree(root)
    _build(root, monkeypatch, shape=(4, 32, 32), value_range=12.0, per_shard=100)
    changed = {INDEX: (root / INDEX).read_bytes(), "build.json": (root / "build.json").read_bytes()}
    for shard in json.loads(changed[INDEX])["shards"]:
        changed[shard["raw_data"]["basename"]] = (root / shard["raw_data"]["basename"]).read_bytes()
    fake_hub.commit_files("someone/imagenet.int8", changed)
    assert len(load_latents("someone/imagenet.int8").shards) == 3
    np.testing.assert_array_equal(load_latents("someone/imagenet.int8", revision=first).codes, local.codes)

    fake_hub.create_repo("someone/empty")  # only the Hub's initial .gitattributes
    with pytest.raises(FileNotFoundError, match="has no index.json at its root: not an MDS dataset"):
        load_latents("someone/empty")
    with pytest.raises(FileNotFoundError, match="could not be fetched .*RepositoryNotFoundError"):
        load_latents("someone/missing")

    # offline (HF_HUB_OFFLINE, as a process started with it set sees it): the cache answers, no
    # request reaches the Hub
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()  # sessions are cached; new ones refuse to connect
    try:
        before = len(fake_hub.request_log)
        offline = load_latents("someone/imagenet.int8", revision=first)
        np.testing.assert_array_equal(offline.codes, local.codes)
        assert len(load_latents("someone/imagenet.int8").shards) == 3  # main, as last fetched
        assert len(fake_hub.request_log) == before
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and the local Hugging Face cache does not hold it"):
            load_latents("someone/not-cached")
    finally:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        reset_sessions()


def test_a_failed_hub_download_never_shows_the_credentials_of_hf_endpoint(monkeypatch, fake_hub):
    """HF_ENDPOINT=http://user:password@host: the error names the Hub redacted, and carries no chained
    exception whose text (the URL the client called) would print the password in a traceback."""
    import traceback

    from huggingface_hub import constants

    fake_hub.basic_auth = ("user", "secretpw")
    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint.replace("http://", "http://user:secretpw@"))
    with pytest.raises(FileNotFoundError) as raised:
        load_latents("someone/missing")
    message = str(raised.value)
    shown = fake_hub.endpoint.replace("http://", "http://***@")
    assert f"could not be fetched from {shown} (RepositoryNotFoundError" in message
    assert fake_hub.stats()["basic_auth_requests"] > 0  # the Hub was asked, with the credentials
    assert "secretpw" not in "".join(traceback.format_exception(raised.value)), message

INDEX = "index.json"
