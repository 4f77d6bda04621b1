"""A damaged dataset is refused when opened, with one error naming the file,
what is wrong and how to repair it; the undamaged dataset reads back identically.

One small dataset is built through the real Dagster graph (tiny-random on the CPU); every test
damages its own copy with real file operations. Shards are located through the published
index.json, never through a hard-coded layout.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import DatasetDamaged, load_latents, open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import make_image_folder, materialize_all

CLASSES = {"alpha": 3, "beta": 2}


def read_all(ds) -> list[tuple[bytes, int, str]]:
    return [(s["latent"].tobytes(), s["label"], s["label_as_text"]) for s in (ds[i] for i in range(ds.num_samples))]


@pytest.fixture(scope="module")
def undamaged_build(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("damaged")
    source = make_image_folder(tmp / "src", CLASSES)
    settings = ImagenetInt8Settings(source=str(source), output=str(tmp / "out"), vae="tiny-random", device="cpu", workers=1)
    results = materialize_all(build_definitions(settings, partitions_per_run=10), dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results)
    root = mds_root(settings.output_path)
    return {"root": root, "samples": read_all(open_dataset(root, shuffle=False))}


def shard_basenames(root: Path) -> list[str]:
    return [s["raw_data"]["basename"] for s in json.loads((root / "index.json").read_text())["shards"]]


def class_of(basename: str) -> str:
    """The class a shard of this test's dataset belongs to: its folder names it."""
    return next(c for c in CLASSES if c in Path(basename).parts[:-1])


@pytest.fixture()
def copy(undamaged_build, tmp_path) -> Path:
    root = tmp_path / "mds"
    shutil.copytree(undamaged_build["root"], root)
    return root


def damaged(root: Path) -> str:
    with pytest.raises(DatasetDamaged) as err:
        open_dataset(root)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_the_undamaged_copy_opens_and_reads_identically(undamaged_build, copy):
    assert len(undamaged_build["samples"]) == sum(CLASSES.values())
    ds = open_dataset(copy, shuffle=False)
    assert read_all(ds) == undamaged_build["samples"]
    assert "content hash of 2 shard(s)" in ds.verified
    assert {label for _, label, _ in undamaged_build["samples"]} == {0, 1}


def test_a_truncated_shard_names_the_file_and_the_class_to_rebuild(copy):
    name = shard_basenames(copy)[0]
    shard = copy / name
    size = shard.stat().st_size
    with open(shard, "r+b") as fh:
        fh.truncate(size - 100)
    message = damaged(copy)
    assert f"{shard} is truncated ({size - 100:,} bytes, index.json says {size:,})" in message
    assert f"rebuild class '{class_of(name)}' (materialize mds_shards for that partition, then mds_dataset)" in message


def test_bytes_flipped_inside_a_latent_are_detected_not_decoded(undamaged_build, copy):
    names = shard_basenames(copy)
    shard = copy / names[-1]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # the shard ends with the last sample's 4096-byte latent
    shard.write_bytes(bytes(data))
    # without verification the reader silently returns a wrong latent: what the hash check prevents
    assert read_all(open_dataset(copy, verify="size", shuffle=False)) != undamaged_build["samples"]
    message = damaged(copy)
    assert f"{shard} has changed bytes (its xxh3_64 is" in message
    assert f"rebuild class '{class_of(names[-1])}'" in message


@pytest.mark.parametrize(
    "content, what",
    [
        (b"\x89PNG\r\n\x1a\n\xff\xfe garbage", "is not UTF-8 text"),
        (b"<html>not an index</html>", "is not valid JSON"),
        (b'{"version": 2, "shards": {}}', "has no 'shards' list"),
        (b'{"version": 2, "shards": [{"raw_data": {"basename": "../../etc/passwd", "bytes": 1}}]}', "points outside"),
        (b'{"version": 2, "shards": [{"raw_data": {"basename": "shard.00000.mds", "bytes": 1}}]}', "has no column_"),
    ],
)
def test_a_garbage_index_says_to_rerun_the_merged_dataset_step(copy, content, what):
    (copy / "index.json").write_bytes(content)
    message = damaged(copy)
    assert message.startswith(f"Dataset damaged: {copy / 'index.json'} ")
    assert what in message and "re-run the merged dataset step (materialize mds_dataset)" in message


def test_a_truncated_index_says_truncated(copy):
    index = copy / "index.json"
    data = index.read_bytes()
    index.write_bytes(data[: len(data) // 2])
    message = damaged(copy)
    assert f"{index} is truncated ({len(data) // 2} bytes)" in message
    assert "materialize mds_dataset" in message


def test_a_missing_index(copy):
    (copy / "index.json").unlink()
    assert f"{copy / 'index.json'} is missing; re-run the merged dataset step" in damaged(copy)
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        open_dataset(copy / "nowhere")


def test_a_missing_shard_names_it_and_its_class(copy):
    name = shard_basenames(copy)[1]
    (copy / name).unlink()
    message = damaged(copy)
    assert f"{copy / name} is missing" in message and f"rebuild class '{class_of(name)}'" in message


def test_a_missing_class_folder_is_named(copy):
    names = shard_basenames(copy)
    parts = Path(names[0]).parts
    folder = copy.joinpath(*parts[: parts.index(class_of(names[0])) + 1])  # the class's own folder
    shutil.rmtree(folder)
    message = damaged(copy)
    assert f"{copy / names[0]} is missing (the folder {folder} does not exist)" in message
    assert f"rebuild class '{class_of(names[0])}'" in message
    assert str(copy / names[1]) not in message  # the other class is intact


def test_several_damaged_shards_are_all_listed(copy):
    names = shard_basenames(copy)
    for name in names:
        (copy / name).unlink()
    with pytest.raises(DatasetDamaged) as err:
        open_dataset(copy)
    assert len(err.value.problems) == len(names)
    assert all(f"rebuild class '{class_of(n)}'" in str(err.value) for n in names)


def test_decode_parameters_come_from_the_index_record(undamaged_build, copy):
    index = json.loads((copy / "index.json").read_text())
    assert index["imagenet_int8"]["latent_shape"] == [4, 32, 32]
    (copy / "build.json").unlink()  # the index's own record is enough
    assert read_all(open_dataset(copy, shuffle=False)) == undamaged_build["samples"]
    index["imagenet_int8"]["latent_shape"] = [16, 32, 32]  # a record that contradicts the shards
    (copy / "index.json").write_text(json.dumps(index))
    message = damaged(copy)
    assert "does not hold latents of shape (16, 32, 32)" in message and "materialize mds_dataset" in message


def _published_style(undamaged_build, tmp_path, change=lambda shards: None) -> tuple[Path, list[dict]]:
    """A class of ``built`` laid out as the published Imagenet.int8: flat shard names, no build.json,
    no hashes; ``change`` edits the index's shard entries before it is written."""
    name = shard_basenames(undamaged_build["root"])[0]
    flat = tmp_path / "imagenet.int8"
    flat.mkdir()
    version = (undamaged_build["root"] / name).parent
    index = json.loads((version / "index.json").read_text())
    for shard in index["shards"]:
        shutil.copy(version / shard["raw_data"]["basename"], flat / shard["raw_data"]["basename"])
        shard["raw_data"]["hashes"] = {}
    change(index["shards"])
    (flat / "index.json").write_text(json.dumps({"version": 2, "shards": index["shards"]}))
    return flat, index["shards"]


def test_a_published_style_dataset_without_hashes_is_checked_by_size(undamaged_build, tmp_path):
    """The published Imagenet.int8: flat shard names, no build.json, no hashes."""
    flat, shards = _published_style(undamaged_build, tmp_path)
    with pytest.warns(UserWarning, match="record no content hash .* verified their sizes only"):
        ds = open_dataset(flat, shuffle=False)
    assert ds.verified.startswith("existence and size")
    assert ds.latent_shape == (4, 32, 32) and ds.value_range == 12.0  # the published defaults
    assert read_all(ds) == [s for s in undamaged_build["samples"] if s[2] == class_of(shard_basenames(undamaged_build["root"])[0])]
    shard = flat / shards[0]["raw_data"]["basename"]
    with open(shard, "r+b") as fh:
        fh.truncate(10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        message = damaged(flat)
    assert f"{shard} is truncated" in message and "re-download this shard" in message


def test_verify_none_and_bad_verify_values(copy):
    (copy / shard_basenames(copy)[0]).unlink()
    assert open_dataset(copy, verify="none").verified.startswith("nothing")
    with pytest.raises(ValueError, match="verify='sha'"):
        open_dataset(copy, verify="sha")


def shard_samples(root: Path) -> list[int]:
    return [s["samples"] for s in json.loads((root / "index.json").read_text())["shards"]]


def set_first_count(root: Path, count: int) -> Path:
    """Make index.json record ``count`` samples for the first shard; returns that shard's path."""
    index = json.loads((root / "index.json").read_text())
    index["shards"][0]["samples"] = count
    (root / "index.json").write_text(json.dumps(index))
    return root / index["shards"][0]["raw_data"]["basename"]


@pytest.mark.parametrize("change", ["zero", "one less", "one more", "ten million"])
def test_an_index_whose_sample_count_disagrees_with_its_shard_is_damage(copy, change):
    """Streaming sizes the dataset by the index's counts and load_latents allocates with them: a
    count that disagrees with the shard would drop or invent samples, or exhaust memory."""
    n = shard_samples(copy)[0]
    count = {"zero": 0, "one less": n - 1, "one more": n + 1, "ten million": 10_000_000}[change]
    shard = set_first_count(copy, count)
    expected = f"{shard} holds {n:,} samples (the count it starts with), index.json says {count:,}"
    repair = f"To repair: rebuild class '{class_of(str(shard.relative_to(copy)))}'"
    for verify in ("hash", "size"):
        with pytest.raises(DatasetDamaged) as err:
            open_dataset(copy, verify=verify)
        assert expected in str(err.value) and repair in str(err.value) and "\n" not in str(err.value)
    for verify in ("hash", "size", "none"):  # checked before anything is allocated, whatever verify says
        with pytest.raises(DatasetDamaged) as err:
            load_latents(copy, verify=verify)
        assert expected in str(err.value) and repair in str(err.value)


def test_a_count_that_the_shard_header_repeats_must_still_fit_the_file(copy):
    """A shard whose first bytes were changed to the same wrong count as its index entry: the file
    is far too short for that many samples, which is damage, not a 40 GB allocation."""
    shard = set_first_count(copy, 10_000_000)
    data = bytearray(shard.read_bytes())
    data[:4] = (10_000_000).to_bytes(4, "little")
    shard.write_bytes(bytes(data))
    expected = rf"{shard.name} has {len(data):,} bytes, too few for the 10,000,000 samples"
    for run in (lambda: open_dataset(copy, verify="size"), lambda: load_latents(copy, verify="none")):
        with pytest.raises(DatasetDamaged, match=expected):
            run()


def test_a_published_style_dataset_with_a_wrong_count_is_damage(undamaged_build, tmp_path):
    """The published layout (flat shard names, no hashes): the count is checked all the same."""
    flat, shards = _published_style(undamaged_build, tmp_path, lambda s: s[0].update(samples=s[0]["samples"] + 1))
    n = shards[0]["samples"] - 1
    shard = flat / shards[0]["raw_data"]["basename"]
    expected = rf"{shard.name} holds {n} samples .* says {n + 1}\..*re-download this shard"
    for run in (lambda: open_dataset(flat, verify="hash"), lambda: load_latents(flat)):
        with pytest.raises(DatasetDamaged, match=expected), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "verified their sizes only": tested above
            run()
