"""The Hub dataset card: written from a real built output, valid for huggingface_hub, honest about
random weights and missing inputs, and with a reading snippet that really reads the dataset."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
from huggingface_hub import DatasetCard

from imagenet_int8_assets.core.hub import dataset_card as dc
from imagenet_int8_assets.core.dataset import mds, mds_index
from imagenet_int8_assets.core.common.layout import manifest_path, mds_root
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import make_image_folder, materialize_all

REPO_ID = "someone/imagenet-int8-card-test"
SDXL_SHA = "1598f3d24932bcfe6634e8b618ea1e30ab1d57f5aad13a6d2de446d2199f2341"
SDXL_REVISION = "bf2fb3a5dbc4ec6c7fc3d3e2a1b5a6bce3ad8c00"


@pytest.fixture(scope="module")
def card_output(tmp_path_factory):
    """A tiny output built by the real graph (tiny-random VAE): a wnid class, a class named 'a|b',
    an empty (bad) file and a text file (skipped) in the source."""
    tmp = tmp_path_factory.mktemp("card-build")
    make_image_folder(tmp / "src", {"n01440764": 3, "a|b": 2})
    (tmp / "src" / "a|b" / "broken.JPEG").write_bytes(b"")
    (tmp / "src" / "a|b" / "notes.txt").write_text("not an image")
    settings = ImagenetInt8Settings(
        source=str(tmp / "src"), output=str(tmp / "out"), vae="tiny-random", device="cpu", workers=1, report_per_class=1
    )
    with pytest.MonkeyPatch.context() as mp:  # streaming's shared memory and locks: a temp dir of its own
        (tmp / "tmpdir").mkdir()
        mp.setenv("TMPDIR", str(tmp / "tmpdir"))
        results = materialize_all(build_definitions(settings, partitions_per_run=3), dg.DagsterInstance.ephemeral(), 3)
    assert all(r.success for r in results)
    return settings.output_path


def _front_matter(card: str) -> str:
    return card.split("---\n")[1]


def _section(card: str, heading: str) -> str:
    start = card.index(heading)
    end = card.find("\n## ", start + len(heading))
    return card[start : end if end >= 0 else len(card)]


def _table_rows(block: str) -> list[list[str]]:
    """Cells of a markdown table's body rows, with markdown escapes undone."""
    lines = [line for line in block.splitlines() if line.startswith("|")][2:]
    return [
        [re.sub(r"\\(.)", r"\1", cell.strip()) for cell in re.split(r"(?<!\\)\|", line)[1:-1]]
        for line in lines
    ]


def test_card_of_a_built_output_is_a_valid_dataset_card(card_output):
    inputs = dc.card_inputs(card_output)
    assert inputs.missing == {}
    card = dc.render_card(inputs, repo_id=REPO_ID, parquet=False)
    assert card == dc.render_card(dc.card_inputs(card_output), repo_id=REPO_ID, parquet=False)  # deterministic
    assert card == dc.render_card(inputs, repo_id=REPO_ID, license=None, parquet=False)  # None/"": the default

    parsed = DatasetCard(card)
    data = parsed.data.to_dict()
    assert data["license"] == "other"
    assert data["license_name"] == dc.IMAGENET_LICENSE_NAME and data["license_link"] == dc.IMAGENET_LICENSE_LINK
    assert data["size_categories"] == ["n<1K"]
    assert data["viewer"] is False and "configs" not in data
    assert "image-classification" in data["task_categories"]
    assert {"latents", "vae", "mds", "autoencoder-kl"} <= set(data["tags"])
    assert "imagenet" not in data["tags"]  # 'a|b' is not an ImageNet class
    assert dc.validate_card(card) == []
    # the body explains the default license, links the report's grid relatively
    assert "ImageNet's [terms of access]" in card and "license: other" in card
    assert "![Original | decoded from the float latent | decoded from the uint8 code](report/grid.png)" in card
    assert "LPIPS skipped" in card
    record = json.loads((mds_root(card_output) / "build.json").read_text())
    assert f"`{record['dequantize']}`" in card


def test_parquet_card_declares_the_export_for_datasets(card_output):
    card = dc.render_card(dc.card_inputs(card_output), repo_id=REPO_ID, license="cc-by-4.0", parquet=True, pretty_name="Tiny | test")
    parsed = DatasetCard(card)
    data = parsed.data.to_dict()
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/*.parquet"}]}]
    assert "viewer" not in data and data["license"] == "cc-by-4.0" and "license_name" not in data
    assert data["pretty_name"] == "Tiny | test"
    assert dc.validate_card(card) == []
    # datasets reads the same configs from the card (what load_dataset and the viewer use)
    from datasets.utils.metadata import MetadataConfigs

    configs = MetadataConfigs.from_dataset_card_data(parsed.data)
    assert configs["default"]["data_files"] == [{"split": "train", "path": "data/*.parquet"}]
    assert f'load_dataset("{REPO_ID}", split="train")' in card
    assert "\n# Tiny | test\n" in card  # a heading needs no escaped pipe


def test_validate_card_reports_broken_cards(card_output):
    good = dc.render_card(dc.card_inputs(card_output), repo_id=REPO_ID, parquet=True)
    assert dc.validate_card(good) == []
    assert any("size_categories" in p and "'1K<n<2K'" in p for p in dc.validate_card(good.replace("n<1K", "1K<n<2K")))
    invalid_yaml = good.replace("license: other\n", "license: [other\n", 1)
    assert [p for p in dc.validate_card(invalid_yaml) if "not valid YAML" in p]
    assert dc.validate_card("# no metadata\n")[0].startswith("no YAML metadata block")
    assert any("'imagenet'" in p for p in dc.validate_card(good.replace("license: other", "license: imagenet")))
    assert any("license_name" in p for p in dc.validate_card(good.replace("license_name: imagenet-terms-of-access\n", "")))
    assert any("task_categories" in p for p in dc.validate_card(good.replace("- text-to-image", "- latent-magic")))
    broken_configs = good.replace("    path: data/*.parquet", "    files: data/*.parquet")
    assert any(p.startswith("configs[0]") for p in dc.validate_card(broken_configs))
    assert any("no text" in p for p in dc.validate_card(good.split("\n---\n")[0] + "\n---\n"))


def test_size_categories_follow_the_hub():
    import datasets

    hub_list = json.loads((Path(datasets.__file__).parent / "utils/resources/size_categories.json").read_text())
    assert list(dc.HUB_SIZE_CATEGORIES) == hub_list
    cases = {0: "n<1K", 999: "n<1K", 1000: "1K<n<10K", 9999: "1K<n<10K", 10_000: "10K<n<100K",
             1_281_167: "1M<n<10M", 999_999: "100K<n<1M"}
    assert {n: dc.size_category(n) for n in cases} == cases


def test_random_weights_build_is_flagged(card_output):
    inputs = dc.card_inputs(card_output)
    assert inputs.record["vae"]["source"] == "random"
    warning = dc.random_weights_warning(inputs.record)
    assert warning is not None and "RANDOM weights" in warning and "tiny-random" in warning
    card = dc.render_card(inputs, repo_id=REPO_ID, parquet=False)
    assert "## WARNING: not a real latent dataset" in card
    assert card.index("## WARNING") < card.index("## How it was built")  # prominent: right after the title

    fallback = copy.deepcopy(inputs.record)
    fallback["vae"].update(requested="stabilityai/sdxl-vae", fallback_reason="no network", extra={"loaded_preset": "sdxl-random"})
    text = dc.random_weights_warning(fallback)
    assert "'stabilityai/sdxl-vae' could not be loaded (no network)" in text and "'sdxl-random'" in text


def test_real_weights_record_shows_its_provenance_and_no_warning(card_output):
    inputs = dc.card_inputs(card_output)
    record = copy.deepcopy(inputs.record)
    record["vae"].update(
        requested="stabilityai/sdxl-vae", repo_id="stabilityai/sdxl-vae", revision=SDXL_REVISION,
        weights_sha256=SDXL_SHA, source="hub", extra={}, folder="/cache/sdxl",
    )
    assert dc.random_weights_warning(record) is None
    card = dc.render_card(dataclasses.replace(inputs, record=record), repo_id=REPO_ID, parquet=False)
    assert "WARNING" not in card and "RANDOM" not in card
    built_rows = {row[0]: row[1].replace("`", "") for row in _table_rows(_section(card, "## How it was built"))}
    assert built_rows["repository"] == "[stabilityai/sdxl-vae](https://huggingface.co/stabilityai/sdxl-vae)"
    assert built_rows["revision"] == SDXL_REVISION and built_rows["weights SHA-256"] == SDXL_SHA
    assert built_rows["weights"] == "trained weights from the Hugging Face Hub"
    assert dc.validate_card(card) == []


def test_counts_per_class_and_bad_files_match_the_build(card_output):
    inputs = dc.card_inputs(card_output)
    card = dc.render_card(inputs, repo_id=REPO_ID, parquet=False)
    section = _section(card, "## Classes and counts")
    details = section[section.index("<details>") : section.index("</details>")]
    rows = _table_rows(details)
    record = json.loads((mds_root(card_output) / "build.json").read_text())
    assert {row[1]: int(row[3]) for row in rows} == record["per_class"] == {"n01440764": 3, "a|b": 2}
    assert {row[1]: int(row[0]) for row in rows} == {"a|b": 0, "n01440764": 1}  # labels from the shards' classes
    manifest = pd.read_parquet(manifest_path(card_output))
    bad, skipped = int((manifest["status"] == "bad").sum()), int((manifest["status"] == "skipped").sum())
    assert (bad, skipped) == (1, 1)
    assert f"**{bad:,} bad**" in section and f"**{skipped:,} skipped**" in section
    reasons = _table_rows(section[section.index("| status |") :])
    assert sorted((r[0], r[1], int(r[2])) for r in reasons) == [("bad", "empty file", 1), ("skipped", "not an image file", 1)]
    assert "a|b/broken.JPEG: empty file (0 bytes)" in [r[3] for r in reasons]


def test_missing_inputs_are_stated_not_fatal(card_output, tmp_path):
    copy_root = tmp_path / "out"
    shutil.copytree(card_output, copy_root, ignore=shutil.ignore_patterns("dagster_home", "crops", "latents", "probe"))
    shutil.rmtree(copy_root / "report")
    (copy_root / "stats" / "quantization_stats.json").unlink()
    manifest_path(copy_root).unlink()
    inputs = dc.card_inputs(copy_root)
    assert set(inputs.missing) == {"report", "stats", "manifest"}
    card = dc.render_card(inputs, repo_id=REPO_ID, parquet=False)
    assert "No reconstruction report: report/summary.json is missing (materialize reconstruction\\_report)." in card
    assert "No quantization statistics: stats/quantization\\_stats.json is missing (materialize quantization\\_stats)." in card
    assert "Bad and skipped source files: unknown" in card and "report/grid.png)" not in card
    assert dc.validate_card(card) == []
    # labels still come from the published classes; the counts from the record
    assert "| 1 | n01440764 | n01440764 | 3 |" in card
    with pytest.raises(FileNotFoundError, match="materialize mds_dataset"):
        dc.card_inputs(tmp_path / "nothing")


def _python_block(card: str, heading: str) -> str:
    section = card[card.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _run_snippet(card: str, dataset: Path, work: Path) -> dict:
    """Run the card's StreamingDataset snippet as a user would, in its own folder and TMPDIR, with
    the folder it reads from being ``dataset``; returns its first batch."""
    code = _python_block(card, "### 1.")
    download_dir = re.search(r'remote_train_dir = "\./([^"]+)"', code).group(1)
    work.mkdir()
    (work / download_dir).symlink_to(dataset, target_is_directory=True)
    (work / "snippet.py").write_text(code)
    driver = (
        "import runpy, numpy as np\n"
        "g = runpy.run_path('snippet.py', run_name='__main__')\n"
        "np.savez('batch.npz', latents=np.asarray(g['latents']), labels=np.asarray(g['labels']), "
        "texts=np.asarray(list(g['texts'])))\n"
    )
    # a TMPDIR of its own, short: multiprocessing's sockets live there (AF_UNIX paths are limited)
    env = {**os.environ, "TMPDIR": tempfile.mkdtemp(prefix="snippet")}
    out = subprocess.run([sys.executable, "-c", driver], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with np.load(work / "batch.npz") as batch:
        return {k: batch[k] for k in batch.files}


def _expected(dataset: Path) -> dict[bytes, tuple[int, str]]:
    ds = open_dataset(dataset)
    return {ds[i]["latent"].tobytes(): (ds[i]["label"], ds[i]["label_as_text"]) for i in range(ds.num_samples)}


def _check_batch(batch: dict, expected: dict, shape: tuple) -> None:
    latents = batch["latents"]
    assert latents.dtype == np.float32 and latents.shape[1:] == shape and len(latents) > 0
    for latent, label, text in zip(latents, batch["labels"], batch["texts"]):
        assert latent.tobytes() in expected, "a latent the snippet decoded is not what open_dataset returns"
        assert expected[latent.tobytes()] == (int(label), str(text))


@pytest.mark.slow
def test_streaming_snippet_reads_the_built_dataset_like_open_dataset(card_output, tmp_path):
    card = dc.render_card(dc.card_inputs(card_output), repo_id=REPO_ID, parquet=False)
    assert '_encodings["uint8"] = uint8' in card and "* 24.0" in card
    batch = _run_snippet(card, mds_root(card_output), tmp_path / "user")
    _check_batch(batch, _expected(mds_root(card_output)), (4, 32, 32))


@pytest.mark.slow
def test_streaming_snippet_for_the_ndarray_layout(tmp_path):
    """A dataset outside the published schema (range +-8): ndarray:uint8 column, other constants."""
    root = tmp_path / "out" / "mds"
    codes = np.random.default_rng(3).integers(0, 256, (5, 4, 32, 32), dtype=np.uint8)
    info = {"vae": {"requested": "tiny-random", "source": "random", "family": "autoencoder-kl"}, "seed": 0,
            "crops": {"recipe": "adm", "size": 256}, "precision": "fp32", "latent_value": "mean"}
    mds.write_class_shards(root, "n01443537", codes, 1, "goldfish, Carassius auratus", info, value_range=8.0)
    index, summary = mds_index.merged_index(root, ["n01443537"])
    mds_index.swap_in_index(root, index, mds_index.dataset_record(mds_index.read_class_build_info(root, "n01443537"), summary))

    inputs = dc.card_inputs(tmp_path / "out")
    assert set(inputs.missing) == {"report", "stats", "manifest"}
    card = dc.render_card(inputs, repo_id=REPO_ID, parquet=False)
    assert dc.validate_card(card) == [] and "imagenet" in DatasetCard(card).data.tags
    code = _python_block(card, "### 1.")
    assert "_encodings" not in code and "ndarray:uint8:4,32,32" in code and "* 16.0" in code
    assert "`z = (u / 255 - 0.5) * 16`" in card and "+-8 (step 0.0627" in card
    batch = _run_snippet(card, root, tmp_path / "user")
    _check_batch(batch, _expected(root), (4, 32, 32))
