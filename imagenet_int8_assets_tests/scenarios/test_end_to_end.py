"""The whole graph on the messy sample with tiny-random, read back the way the seed's reader does."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap

import dagster as dg
import numpy as np
import pytest
import pandas as pd

from imagenet_int8_assets.core.dataset.mds_index import class_home
from imagenet_int8_assets.core.latents.quantize import quantize
from imagenet_int8_assets.core.common.layout import manifest_path, mds_root
from imagenet_int8_assets.core.latents.latent_store import read_latents

SEED_STYLE_READER = textwrap.dedent(
    '''
    # Written the way seeds/000 reads Imagenet.int8; imports nothing from this project.
    import hashlib, json, sys
    from typing import Any
    import numpy as np
    import torch
    from streaming import StreamingDataset
    from streaming.base.format.mds.encodings import Encoding, _encodings

    class uint8(Encoding):
        def encode(self, obj: Any) -> bytes:
            return obj.tobytes()

        def decode(self, data: bytes) -> Any:
            x = np.frombuffer(data, np.uint8).astype(np.float32)
            return (x / 255.0 - 0.5) * 24.0

    _encodings["uint8"] = uint8

    train_dataset = StreamingDataset(
        local=sys.argv[2], remote=sys.argv[1], split=None, shuffle=True,
        shuffle_algo="naive", num_canonical_nodes=1, batch_size=4,
    )
    loader = torch.utils.data.DataLoader(train_dataset, batch_size=4, num_workers=2)
    rows = []
    for batch in loader:
        latents = batch["vae_output"].reshape(-1, 4, 32, 32)
        for i in range(latents.shape[0]):
            z = latents[i].numpy()
            u8 = np.rint((z / 24.0 + 0.5) * 255.0).astype(np.uint8)
            rows.append({
                "label": batch["label"][i],
                "label_as_text": batch["label_as_text"][i],
                "min": float(z.min()), "max": float(z.max()),
                "sha1": hashlib.sha1(u8.tobytes()).hexdigest(),
            })
    print(json.dumps(rows))
    '''
)


def test_every_run_and_check_succeeds(built_sample):
    for result in built_sample["results"]:
        assert result.success
    checks = [
        e.event_specific_data
        for r in built_sample["results"]
        for e in r.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    ]
    assert {c.check_name for c in checks} == {"latents_are_finite", "mds_count_matches_manifest", "reconstruction_quality"}
    assert all(c.passed for c in checks if c.check_name != "reconstruction_quality")


@pytest.mark.slow
def test_seed_reader_reads_every_good_image_exactly_once_unchanged(built_sample, tmp_path):
    settings = built_sample["settings"]
    out = settings.output_path
    manifest = pd.read_parquet(manifest_path(out))
    ok = manifest[manifest["status"] == "ok"]
    expected = []
    for folder in sorted(ok["class_folder"].unique()):
        ids, arrays, _ = read_latents(out, folder)
        assert sorted(ids) == sorted(ok[ok["class_folder"] == folder]["id"])
        row = ok[ok["class_folder"] == folder].iloc[0]
        for u8 in quantize(arrays["latent"]):
            expected.append((str(row["label"]), row["label_text"], hashlib.sha1(u8.tobytes()).hexdigest()))
    proc = subprocess.run(
        [sys.executable, "-c", SEED_STYLE_READER, str(mds_root(out)), str(tmp_path / "local")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    got = sorted((r["label"], r["label_as_text"], r["sha1"]) for r in rows)
    assert got == sorted(expected)  # every good image once, bytes unchanged
    assert len(rows) == len(ok) == 21
    assert {r["label"] for r in rows} == {"0", "217", "482", "491"}
    assert "tench, Tinca tinca" in {r["label_as_text"] for r in rows}
    assert all(-12.0 <= r["min"] <= r["max"] <= 12.0 for r in rows)


def test_metadata_tells_the_story(built_sample):
    instance, defs = built_sample["instance"], built_sample["defs"]

    def latest(key, partition=None):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None),
            limit=1,
        ).records
        return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}

    manifest = latest("raw_manifest")
    assert (manifest["ok"], manifest["bad"], manifest["skipped"]) == (21, 4, 1)
    assert "decompression bomb" in manifest["bad_and_skipped_files"]
    latents = latest("vae_latents", "n01440764")
    assert latents["images"] == 5 and latents["latent_shape"] == "(4, 32, 32)" and latents["non_finite_values"] == 0
    assert latents["vae"] == "tiny-random" and latents["vae_fallback"] is False
    stats = latest("quantization_stats")
    assert stats["values"] == 21 * 4096 and 0 <= stats["clip_fraction"] <= 1 and stats["quant_rmse"] > 0
    assert "p99.9" in stats["per_channel"]
    dataset = latest("mds_dataset")
    assert dataset["samples"] == 21 and dataset["classes"] == 4 and "open_dataset" in dataset["read_it"]
    materialized = instance.get_materialized_partitions(dg.AssetKey("mds_shards"))
    assert materialized == set(defs.resolve_assets_def("mds_shards").partitions_def.get_partition_keys(dynamic_partitions_store=instance))


def test_rebuilding_a_partition_gives_the_same_bytes_and_no_leftovers(built_sample):
    settings, defs, instance = built_sample["settings"], built_sample["defs"], built_sample["instance"]
    root = mds_root(settings.output_path)
    home = class_home(root, "n02102040")
    before = {p.relative_to(root): p.read_bytes() for p in home.rglob("*.mds")}
    published = (root / "index.json").read_bytes()
    (home / ".tmp-deadbeef").mkdir()  # what a run killed mid-write leaves behind
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        partition_key="n02102040",
        asset_selection=[dg.AssetKey(k) for k in ("preprocessed_crops", "vae_latents", "mds_shards")],
    )
    assert result.success
    after = {p.relative_to(root): p.read_bytes() for p in home.rglob("*.mds")}
    assert before == after and before  # same bytes, hence the same version folder
    assert not [p for p in home.iterdir() if p.name.startswith(".")]
    assert (root / "index.json").read_bytes() == published
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("quantization_stats"), dg.AssetKey("mds_dataset")])
    assert result.success
    assert (root / "index.json").read_bytes() == published  # nothing changed: nothing published
    index = json.loads(published)
    assert sum(s["samples"] for s in index["shards"]) == 21
    assert len({s["raw_data"]["basename"] for s in index["shards"]}) == len(index["shards"])
    with np.load(settings.output_path / "latents" / "n02102040" / "latents.npz") as data:
        assert np.isfinite(data["latent"]).all()


def test_reconstruction_report_and_probe_are_pictures_and_tables(built_sample):
    from PIL import Image

    from imagenet_int8_assets.core.quality.report_figures import grid_size

    settings, instance = built_sample["settings"], built_sample["instance"]
    report = settings.output_path / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["images"] == 16  # 4 per class (the default) x 4 classes
    assert np.isfinite(summary["psnr_float"]) and abs(summary["psnr_gap"]) < 1.0
    with Image.open(report / "grid.png") as grid:
        assert grid.size == grid_size(8, 128)
    html = (report / "report.html").read_text()
    assert "Per class" in html and html.count("data:image/png;base64,") == 4 and "LPIPS skipped" in html
    rows = (report / "metrics.csv").read_text().splitlines()
    assert len(rows) == 17 and rows[0].startswith("class,id,psnr_float")
    meta = instance.get_latest_materialization_event(dg.AssetKey("reconstruction_report")).asset_materialization.metadata
    assert meta["grid"].value.startswith("![original | from float | from uint8](data:image/png;base64,")
    assert "n01440764" in meta["per_class"].value
    probe = instance.get_latest_materialization_event(dg.AssetKey("latent_probe")).asset_materialization.metadata
    assert "| Logistic Regression |" in probe["accuracy"].value and "Chance (most frequent)" in probe["accuracy"].value
    for name in ("confusion_matrix", "pca", "feature_density"):
        assert probe[name].value.startswith("![")
        with Image.open(settings.output_path / "probe" / "report" / f"{name}.png") as img:
            assert img.size[0] > 100
