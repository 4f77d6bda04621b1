"""Parquet export: read back by ``datasets.load_dataset``, equal to the MDS dataset row for row."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.reading.latent_arrays import load_latents
from imagenet_int8_assets.core.reading.parquet_export import export_parquet, image_ids_from_output
from imagenet_int8_assets.core.latents.quantize import dequantize, quantize
from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.latents.latent_store import write_latents
from imagenet_int8_assets.reader import open_dataset

CLASSES = {"n01440764": (0, "tench, Tinca tinca", 5), "n02676566": (402, "acoustic guitar", 7), "zz": (7, "z", 3)}
META = {"vae": {"family": "autoencoder-kl", "requested": "tiny-random", "quant_range": 12.0}, "seed": 0}


def _build_output(out, monkeypatch, flips=True):
    """An output folder as the assets leave it: latents/<class>/ (float latents and image ids) and
    the shards quantized from them (several per class), published as mds/."""
    monkeypatch.setattr(mds, "SIZE_LIMIT", 3 * (2 * 4096 + 100))
    written = {}
    for seed, (name, (label, text, n)) in enumerate(CLASSES.items()):
        rng = np.random.default_rng(seed)
        ids = [f"{name}/{name}_{i:04d}.JPEG" for i in range(n)]
        arrays = {"latent": rng.normal(0, 6, (n, 4, 32, 32)).astype(np.float32)}
        if flips:
            arrays["latent_flip"] = rng.normal(0, 6, (n, 4, 32, 32)).astype(np.float32)
        write_latents(out, name, ids, arrays, META)
        codes = {k: quantize(v, 12.0) for k, v in arrays.items()}
        mds.write_class_shards(mds_root(out), name, codes["latent"], label, text, {**META, "label": label},
                               flips_u8=codes.get("latent_flip"))
        written[name] = (ids, codes)
    root = mds_root(out)
    index, summary = mds_index.merged_index(root, list(CLASSES))
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, "zz"), summary))
    return root, written


@pytest.fixture()
def hf_offline(tmp_path, monkeypatch):
    """datasets with its caches under tmp_path, offline."""
    import datasets

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")

    def load(files):
        return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf" / "datasets"))

    return load


def test_export_is_read_by_datasets_and_equals_the_mds_dataset(tmp_path, monkeypatch, hf_offline):
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    root, written = _build_output(out, monkeypatch)
    assert len(json.loads((root / "index.json").read_text())["shards"]) > len(CLASSES)  # several shards per class
    path = tmp_path / "export" / "imagenet_int8.parquet"
    assert export_parquet(root, path, output=out) == [path]

    table = hf_offline(str(path))
    streaming = open_dataset(root, shuffle=False)  # the MDS order
    assert len(table) == streaming.num_samples == 15
    assert set(table.features) == {"vae_output", "vae_output_flip", "label", "label_as_text", "image_id"}
    codes = np.concatenate([c["latent"] for _, c in written.values()])
    flips = np.concatenate([c["latent_flip"] for _, c in written.values()])
    ids = [i for class_ids, _ in written.values() for i in class_ids]
    for i, row in enumerate(table):
        sample = streaming[i]
        assert row["vae_output"] == codes[i].tobytes()  # the bytes the shards hold
        assert row["vae_output_flip"] == flips[i].tobytes()
        latent = dequantize(np.frombuffer(row["vae_output"], np.uint8), 12.0).reshape(4, 32, 32)
        np.testing.assert_array_equal(latent, sample["latent"])
        np.testing.assert_array_equal(dequantize(np.frombuffer(row["vae_output_flip"], np.uint8), 12.0).reshape(4, 32, 32),
                                      sample["latent_flip"])
        assert (row["label"], row["label_as_text"]) == (sample["label"], sample["label_as_text"])
        assert row["image_id"] == ids[i]

    record = json.loads(pq.read_schema(path).metadata[b"imagenet_int8"])
    assert record["dequantize"] == "z = (u / 255 - 0.5) * 24" and record["latent_shape"] == [4, 32, 32]
    assert record["bytes_per_sample"] == 4096 and record["value_range"] == 12.0
    assert record["code_columns"] == ["vae_output", "vae_output_flip"] and record["vae"]["requested"] == "tiny-random"

    # the same input gives the same bytes: again, and from a copy of the dataset elsewhere
    again = tmp_path / "again.parquet"
    export_parquet(root, again, output=out)
    assert again.read_bytes() == path.read_bytes()
    shutil.copytree(root, tmp_path / "copy")
    export_parquet(tmp_path / "copy", again, image_ids=ids)
    assert again.read_bytes() == path.read_bytes()
    assert not list((tmp_path / "export").glob(".tmp-*"))

    # several files (the Hub's split naming): the same rows in the same order
    files = export_parquet(root, tmp_path / "files", output=out, rows_per_file=4)
    assert [p.name for p in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    split = hf_offline(str(tmp_path / "files" / "*.parquet"))
    assert split["vae_output"] == table["vae_output"] and split["image_id"] == ids and split["label"] == table["label"]


def test_one_class_version_and_the_image_id_check(tmp_path, monkeypatch, hf_offline):
    out = tmp_path / "out"
    root, written = _build_output(out, monkeypatch, flips=False)
    version = mds_index.current_version_dir(root, "n02676566")
    path = export_parquet(version, tmp_path / "class.parquet", output=out)[0]
    table = hf_offline(str(path))
    assert "vae_output_flip" not in table.features
    assert table["image_id"] == written["n02676566"][0]
    assert table["label"] == [402] * 7 and set(table["label_as_text"]) == {"acoustic guitar"}
    assert [bytes(v) for v in table["vae_output"]] == [c.tobytes() for c in written["n02676566"][1]["latent"]]

    # no ids given: the column is null
    table = hf_offline(str(export_parquet(version, tmp_path / "noids.parquet")[0]))
    assert table["image_id"] == [None] * 7
    with pytest.raises(ValueError, match="3 image ids for 7 samples"):
        export_parquet(version, tmp_path / "bad.parquet", image_ids=["a", "b", "c"])

    # a class re-encoded after its shards were written: its ids no longer describe the shards
    ids, _ = written["n01440764"]
    write_latents(out, "n01440764", ids, {"latent": np.zeros((5, 4, 32, 32), np.float32)}, META)
    with pytest.raises(ValueError, match=r"Class 'n01440764': the latents in .* do not quantize to the stored codes"):
        image_ids_from_output(load_latents(root), out)
    assert not (tmp_path / "bad.parquet").exists()


@pytest.mark.slow
def test_a_real_build_exports_with_its_image_ids(built_sample, tmp_path, hf_offline):
    from imagenet_int8_assets.core.latents.latent_store import read_latents

    output = built_sample["settings"].output_path
    root = mds_root(output)
    arrays = load_latents(root, verify="hash")
    streaming = open_dataset(root, shuffle=False)
    assert len(arrays) == streaming.num_samples > 0
    for i in range(len(arrays)):
        np.testing.assert_array_equal(arrays.latents(i), streaming[i]["latent"])
        assert int(arrays.labels[i]) == streaming[i]["label"]
    assert arrays.vae_name == "tiny-random" and arrays.vae_family == "autoencoder-kl"
    classes = list(json.loads((root / "index.json").read_text())["imagenet_int8"]["per_class"])
    expected = [i for name in classes for i in read_latents(output, name)[0]]
    table = hf_offline(str(export_parquet(arrays, tmp_path / "sample.parquet", output=output)[0]))
    assert table["image_id"] == expected and table["label"] == arrays.labels.tolist()


# --------------------------------------------------------------------------------------------
# Where an export may write: never over what it did not write


def refusal(dest) -> str:
    """The start of export_parquet's refusal of ``dest``, as a regular expression."""
    return f"export_parquet: refusing to write to {re.escape(str(dest))}: it"


def split_names(count: int) -> list[str]:
    return [f"train-{i:05d}-of-{count:05d}.parquet" for i in range(count)]


def _tree(folder) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): to show that a refusal changed nothing."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_refuses_destinations_holding_what_it_did_not_write(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    root, _ = _build_output(out, monkeypatch, flips=False)
    (out / "dagster_home").mkdir()
    (out / "dagster_home" / "dagster.yaml").write_text("telemetry: {enabled: false}\n")
    before = _tree(out)
    version = mds_index.current_version_dir(root, "n02676566")
    (tmp_path / "link").symlink_to(root)  # a link to the dataset is the dataset

    refused = [  # (source, dest, keywords, what the message says)
        (root, root, {"rows_per_file": 4}, "is the dataset being exported"),
        (root, tmp_path / "link", {"rows_per_file": 4}, "is the dataset being exported"),
        (root, out, {"rows_per_file": 4}, "contains the dataset being exported"),
        (root, out, {"rows_per_file": 4, "output": out}, "is the output folder"),
        (root, out / "exports", {"rows_per_file": 4, "output": out}, "lies inside the output folder"),
        (root, out / "data.parquet", {"output": out}, "lies inside the output folder"),
        (root, root / "classes" / "parquet", {"rows_per_file": 4}, "lies inside the dataset being exported"),
        (root, tmp_path / "link" / "export.parquet", {}, "lies inside the dataset being exported"),
        (version, version / "x.parquet", {}, "lies inside the dataset being exported"),
        (version, root, {"rows_per_file": 4}, "contains the dataset being exported"),
    ]
    for source, dest, kwargs, what in refused:
        with pytest.raises(ValueError, match=f"{refusal(dest)} {what} .*choose a new path") as err:
            export_parquet(source, dest, **kwargs)
        assert "\n" not in str(err.value)
    assert _tree(out) == before  # nothing deleted, nothing added
    assert not list(out.glob(".t*")) and not list(root.glob(".t*"))

    # a folder of the user's own files, a file in the way: refused, untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    (mine / "train-00000-of-00001.parquet").write_bytes(parquet_bytes_of(root))  # one of ours, beside theirs
    kept = _tree(mine)
    notes = re.escape(str(mine / "notes.txt"))
    with pytest.raises(ValueError, match=f"{refusal(mine)} already holds {notes}, which no export wrote.*choose a new or empty"):
        export_parquet(root, mine, rows_per_file=4)
    assert _tree(mine) == kept
    theirs = tmp_path / "theirs.parquet"  # a parquet file, but not an export of a dataset
    pq.write_table(pa.table({"x": [1, 2]}), theirs)
    text = tmp_path / "notes.txt"
    text.write_text("my notes")
    for path in (theirs, text):
        data = path.read_bytes()
        with pytest.raises(ValueError, match=f"{refusal(path)} is a file no export wrote"):
            export_parquet(root, path)
        assert path.read_bytes() == data
    with pytest.raises(ValueError, match=f"{refusal(mine)} is a folder"):
        export_parquet(root, mine)  # one file where a folder is
    with pytest.raises(ValueError, match=f"{refusal(text)} is a file,"):
        export_parquet(root, text, rows_per_file=4)  # a folder where a file is
    assert text.read_text() == "my notes"


def parquet_bytes_of(root) -> bytes:
    from imagenet_int8_assets.core.reading.parquet_export import parquet_bytes

    return parquet_bytes(load_latents(root))


def test_a_previous_export_is_replaced_and_a_fresh_path_is_created(tmp_path, monkeypatch):
    out = tmp_path / "out"
    root, _ = _build_output(out, monkeypatch, flips=False)
    fresh = tmp_path / "new" / "nested" / "files"  # nothing there yet: created
    assert [p.name for p in export_parquet(root, fresh, rows_per_file=4)] == split_names(4)
    # a re-export with another split replaces the earlier files (all of them the export's own)
    files = export_parquet(root, fresh, rows_per_file=8)
    assert sorted(p.name for p in fresh.iterdir()) == [p.name for p in files] == split_names(2)
    one = tmp_path / "one.parquet"
    export_parquet(root, one, output=out)
    first = one.read_bytes()
    assert export_parquet(root, one) == [one] and one.read_bytes() != first  # replaced (now without ids)
    # an empty folder is fine too
    (tmp_path / "empty").mkdir()
    assert len(export_parquet(root, tmp_path / "empty", rows_per_file=15)) == 1
    # but one file the export did not write makes the folder the user's: refused, nothing removed
    (fresh / "README.md").write_text("my split")
    kept = _tree(fresh)
    with pytest.raises(ValueError, match="which no export wrote"):
        export_parquet(root, fresh, rows_per_file=4)
    assert _tree(fresh) == kept
    # a parquet file of ours under a name the folder export does not use is not one of its files
    (fresh / "README.md").unlink()
    (fresh / "train-00000-of-00002.parquet").rename(fresh / "mine.parquet")
    with pytest.raises(ValueError, match="mine.parquet, which no export wrote"):
        export_parquet(root, fresh, rows_per_file=4)


def test_an_export_of_a_hub_snapshot_does_not_write_into_the_cache(tmp_path, monkeypatch, fake_hub):
    out = tmp_path / "out"
    root, _ = _build_output(out, monkeypatch, flips=False)
    files = {"index.json": (root / "index.json").read_bytes()}
    for shard in json.loads(files["index.json"])["shards"]:
        files[shard["raw_data"]["basename"]] = (root / shard["raw_data"]["basename"]).read_bytes()
    fake_hub.create_repo("someone/tiny")
    fake_hub.commit_files("someone/tiny", files)
    arrays = load_latents("someone/tiny")
    cache = arrays.root.parent.parent  # <HF cache>/datasets--someone--tiny (snapshots/<commit>, blobs)
    assert arrays.root.parent.name == "snapshots" and (cache / "blobs").is_dir()
    before = _tree(cache)
    for dest in (arrays.root / "data.parquet", cache / "blobs" / "data.parquet", cache):
        with pytest.raises(ValueError, match=f"{refusal(dest)} .* the dataset being exported"):
            export_parquet("someone/tiny", dest)
    assert _tree(cache) == before
    assert export_parquet(arrays, tmp_path / "tiny.parquet") == [tmp_path / "tiny.parquet"]
