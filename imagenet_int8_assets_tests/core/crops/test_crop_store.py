"""IMAGENET_INT8_CROP_STORAGE (raw, png, none) and IMAGENET_INT8_LATENT_STORAGE (full, latent):
how crops and latents are kept changes the disk footprint, never the dataset's bytes."""

from __future__ import annotations

import json
import os

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from imagenet_int8_assets.build.stages import DATASET_STEPS as FINAL
from imagenet_int8_assets.build.driver import _failures as failures
from imagenet_int8_assets.core.crops.crop_store import CropArray, CropVerificationError, pixel_hash
from imagenet_int8_assets.core.quality.reconstruct import choose_samples
from imagenet_int8_assets.core.common.layout import crops_dir, latents_dir, mds_root
from imagenet_int8_assets.core.common.files import folder_bytes
from imagenet_int8_assets.core.latents.latent_store import latents_to_store, read_latents
from imagenet_int8_assets.core.crops.crop_store import read_crops, read_crops_with_meta, write_crops
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.resources import (
    BYTES_SETTINGS,
    RECORDED,
    ImagenetInt8Settings,
    SettingsError,
)
from imagenet_int8_assets_tests.support.builds import (
    crops,
    make_image_folder,
    materialize_all,
)

# crop storage x latent storage: every crop mode and both latent modes, in three builds
BUILDS = {"raw": "full", "png": "latent", "none": "full"}
CLASSES = {"a": 4, "b": 4}  # 4 per class: the probe trains


def _metadata(instance, asset: str, partition: str | None = None) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def _dataset_files(out) -> dict[str, bytes]:
    """The published dataset: index.json and every shard it names, by path."""
    root = mds_root(out)
    index = json.loads((root / "index.json").read_text())
    files = {"index.json": (root / "index.json").read_bytes()}
    for shard in index["shards"]:
        files[shard["raw_data"]["basename"]] = (root / shard["raw_data"]["basename"]).read_bytes()
    return files


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One tiny source built three times, with each crop storage (and both latent storages)."""
    base = tmp_path_factory.mktemp("storage")
    source = make_image_folder(base / "src", CLASSES)
    built = {}
    for crop_storage, latent_storage in BUILDS.items():
        settings = ImagenetInt8Settings(
            source=str(source), output=str(base / crop_storage), vae="tiny-random", device="cpu", workers=1,
            report_per_class=2, probe_per_class=4, crop_storage=crop_storage, latent_storage=latent_storage,
        )
        defs = build_definitions(settings, partitions_per_run=10)
        instance = dg.DagsterInstance.ephemeral()
        results = materialize_all(defs, instance)
        assert all(r.success for r in results), [failures(r) for r in results]
        built[crop_storage] = {"settings": settings, "defs": defs, "instance": instance}
    return {"source": source, **built}


@pytest.mark.slow
def test_every_crop_and_latent_storage_gives_the_same_dataset_bytes(builds):
    reference = _dataset_files(builds["raw"]["settings"].output_path)
    assert len(reference) > 1
    for mode in ("png", "none"):
        assert _dataset_files(builds[mode]["settings"].output_path) == reference, mode
    # and the same float latents, whatever else each mode keeps
    for key in CLASSES:
        ids, full, _ = read_latents(builds["raw"]["settings"].output_path, key)
        ids_l, latent_only, meta = read_latents(builds["png"]["settings"].output_path, key)
        assert ids == ids_l and set(full) == {"mean", "std", "latent"} and set(latent_only) == {"latent"}
        assert np.array_equal(full["latent"], latent_only["latent"])
        assert "latent_storage" not in meta  # the latents' meta goes into the dataset's build record


def test_each_mode_writes_what_it_says_and_reads_back_the_same_pixels(builds):
    for key in CLASSES:
        files = {mode: sorted(p.name for p in crops_dir(builds[mode]["settings"].output_path, key).rglob("*") if p.is_file())
                 for mode in BUILDS}
        assert files["raw"] == ["images.npy", "meta.json"]
        assert files["none"] == ["meta.json"]
        assert len(files["png"]) == CLASSES[key] + 1 and all(n.endswith(".png") for n in files["png"] if n != "meta.json")
        ids, raw = read_crops(builds["raw"]["settings"].output_path, key)
        assert isinstance(raw, np.ndarray) and raw.shape == (CLASSES[key], 256, 256, 3)
        for mode in ("png", "none"):
            ids_m, pixels = read_crops(builds[mode]["settings"].output_path, key)
            assert isinstance(pixels, CropArray) and ids_m == ids and pixels.shape == raw.shape
            assert np.array_equal(pixels[[1, 0]], raw[[1, 0]])  # only those rows are computed
            assert np.array_equal(np.asarray(pixels), raw)  # pixel-exact (png lossless, none recomputed)
        png = crops_dir(builds["png"]["settings"].output_path, key) / "images" / "000000.png"
        with Image.open(png) as img:
            assert img.format == "PNG" and np.array_equal(np.asarray(img), raw[0])
        meta = read_crops_with_meta(builds["none"]["settings"].output_path, key)[2]
        assert meta["storage"] == "none" and meta["sha256"] == [pixel_hash(c) for c in raw]
        assert meta["source_root"] == str(builds["source"]) and len(meta["source"]["mtime_ns"]) == len(ids)


def test_bytes_per_image_in_the_metadata_match_the_files(builds):
    for mode, latent_storage in BUILDS.items():
        out, instance = builds[mode]["settings"].output_path, builds[mode]["instance"]
        for key, count in CLASSES.items():
            crops_md = _metadata(instance, "preprocessed_crops", key)
            assert crops_md["crop_storage"] == mode
            assert crops_md["bytes"] == folder_bytes(crops_dir(out, key))
            assert crops_md["bytes_per_image"] == pytest.approx(crops_md["bytes"] / count, abs=0.1)
            latents_md = _metadata(instance, "vae_latents", key)
            assert latents_md["latent_storage"] == latent_storage
            assert latents_md["bytes"] == folder_bytes(latents_dir(out, key))
            assert latents_md["bytes_per_image"] == pytest.approx(latents_md["bytes"] / count, abs=0.1)
            shards_md = _metadata(instance, "mds_shards", key)
            version = mds_root(out) / "classes" / key / shards_md["version"]
            assert shards_md["bytes_per_image"] == pytest.approx(folder_bytes(version) / count, abs=0.1)
            assert shards_md["bytes_per_image"] > 4096
            # the stage's share per image: raw = 256*256*3 plus headers; none = meta only
            per_image = crops_md["bytes_per_image"]
            assert {"raw": 196_608 <= per_image < 197_500, "png": per_image < 196_608, "none": per_image < 1_000}[mode]
            latent = 4 * 32 * 32 * 4
            expected = 3 * latent if latent_storage == "full" else latent
            assert expected < latents_md["bytes_per_image"] < expected + 2_000
        totals = _metadata(instance, "quantization_stats")
        assert totals["disk_bytes"] == sum(
            folder_bytes(d) for k in CLASSES for d in (crops_dir(out, k), latents_dir(out, k))
        ) + sum(folder_bytes(mds_root(out) / "classes" / k / _metadata(instance, "mds_shards", k)["version"]) for k in CLASSES)
        assert "bytes_per_image" in totals["disk_footprint"]


def test_latent_only_storage_keeps_the_statistics_report_and_probe_working(builds):
    stats = {m: json.loads((builds[m]["settings"].output_path / "stats" / "quantization_stats.json").read_text()) for m in ("raw", "png")}
    assert stats["raw"] == stats["png"]
    reports = {m: _metadata(builds[m]["instance"], "reconstruction_report") for m in ("raw", "png", "none")}
    for key in ("images", "psnr_float", "psnr_uint8", "ssim_uint8"):
        assert reports["raw"][key] == reports["png"][key] == reports["none"][key], key
    probe = {m: _metadata(builds[m]["instance"], "probe_features") for m in ("raw", "png")}
    assert set(probe["raw"]["feature_sets"]) == {"sample", "mean+std"}
    assert set(probe["png"]["feature_sets"]) == {"sample"}  # no posterior kept: the stored latent only
    assert "accuracy" in _metadata(builds["png"]["instance"], "latent_probe")


def test_none_storage_detects_a_source_file_changed_after_its_crop_was_recorded(builds):
    settings, defs, instance = (builds["none"][k] for k in ("settings", "defs", "instance"))
    job = defs.resolve_implicit_global_asset_job_def()
    ids = read_latents(settings.output_path, "a")[0]
    changed = builds["source"] / ids[int(choose_samples(len(ids), settings.report_per_class, settings.seed, "a")[0])]
    original, stat = changed.read_bytes(), changed.stat()
    try:
        with Image.open(changed) as img:
            pixels = np.asarray(img).copy()
        pixels[100:140, 100:140] = 255 - pixels[100:140, 100:140]
        Image.fromarray(pixels).save(changed, format="JPEG", quality=90)

        latents = job.execute_in_process(
            instance=instance, partition_key="a", asset_selection=[dg.AssetKey("vae_latents")], raise_on_error=False
        )
        assert not latents.success
        message = " ".join(failures(latents))
        assert str(changed) in message and "changed since its crop was recorded" in message, message
        assert "preprocessed_crops" in message and "imagenet-int8 build" in message
        assert "Traceback" not in message

        report = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("reconstruction_report")], raise_on_error=False
        )
        assert not report.success
        assert str(changed) in " ".join(failures(report))

        # the old modification time put back: the hash still catches it
        os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        with pytest.raises(CropVerificationError, match="crop's sha256 differs") as caught:
            np.asarray(read_crops(settings.output_path, "a")[1])
        assert caught.value.paths == [str(changed)]
    finally:
        changed.write_bytes(original)
    # restored bytes crop to the recorded pixels again (the hash decides, not the mtime)
    assert read_crops(settings.output_path, "a")[1][[1]].shape == (1, 256, 256, 3)


def test_png_and_none_round_trip_without_dagster(tmp_path):
    images = crops(3)
    source = tmp_path / "src"
    (source / "c").mkdir(parents=True)
    ids = [f"c/{i}.png" for i in range(3)]
    for name, image in zip(ids, images):
        Image.fromarray(image).save(source / name)  # a lossless source: its 256 crop is itself
    meta = {"recipe": "imagenet.int8", "size": 256, "failed": []}
    for mode in ("raw", "png", "none"):
        write_crops(tmp_path / mode, "c", ids, images, meta, storage=mode, source_root=source)
        got_ids, got = read_crops(tmp_path / mode, "c", mmap=True)
        assert got_ids == ids and np.array_equal(np.asarray(got), images) and got[-1].shape == (256, 256, 3)
    # a moved source: pass its new place
    moved = tmp_path / "moved"
    source.rename(moved)
    with pytest.raises(CropVerificationError, match="is gone") as caught:
        read_crops(tmp_path / "none", "c")[1].load()
    assert caught.value.source_missing
    assert np.array_equal(np.asarray(read_crops(tmp_path / "none", "c", source_root=moved)[1]), images)
    # a damaged PNG is named
    png = tmp_path / "png" / "crops" / "c" / "images" / "000001.png"
    png.write_bytes(png.read_bytes()[:100])
    with pytest.raises(CropVerificationError, match="000001.png"):
        read_crops(tmp_path / "png", "c")[1][[1]]
    # empty classes in every mode
    for mode in ("raw", "png", "none"):
        write_crops(tmp_path / mode, "e", [], np.zeros((0, 16, 16, 3), np.uint8), {**meta, "size": 16}, mode, moved)
        assert np.asarray(read_crops(tmp_path / mode, "e", mmap=True)[1]).shape == (0, 16, 16, 3)


def test_latent_storage_keeps_the_stored_latent_and_its_flip():
    arrays = {k: np.zeros((2, 4, 4, 4), np.float32) for k in ("mean", "std", "latent", "latent_flip")}
    assert set(latents_to_store(arrays, "full")) == set(arrays)
    assert set(latents_to_store(arrays, "latent")) == {"latent", "latent_flip"}


def test_storage_settings_are_validated_and_decide_no_bytes(tmp_path):
    for var, value in (("IMAGENET_INT8_CROP_STORAGE", "jpeg"), ("IMAGENET_INT8_LATENT_STORAGE", "fp16")):
        with pytest.raises(SettingsError, match=f"^{var}='{value}': use "):
            ImagenetInt8Settings.from_env({var: value}, output=str(tmp_path / "out"))
    default = ImagenetInt8Settings(output=str(tmp_path / "out"))
    assert (default.crop_storage, default.latent_storage) == ("none", "full")
    other = ImagenetInt8Settings(output=str(tmp_path / "out"), crop_storage="raw", latent_storage="latent")
    assert all(default.code_version(asset) == other.code_version(asset) for asset in BYTES_SETTINGS)
    assert "crop_storage" not in RECORDED and "latent_storage" not in RECORDED


def test_converting_a_class_to_another_storage_marks_nothing_stale(builds):
    """Re-materializing one class's crops in another mode: same code version and inputs, so the
    same data version, and no class is stale. Its latents too: classes then mix modes and every
    reader still works. Converted back at the end (the other tests read these files)."""
    from imagenet_int8_assets.build.plan import plan_build

    settings, instance = builds["raw"]["settings"], builds["raw"]["instance"]
    converted = ImagenetInt8Settings(**{**settings.model_dump(), "crop_storage": "none", "latent_storage": "latent"})
    job = build_definitions(converted, partitions_per_run=10).resolve_implicit_global_asset_job_def()
    steps = [dg.AssetKey("preprocessed_crops"), dg.AssetKey("vae_latents")]
    try:
        assert job.execute_in_process(instance=instance, partition_key="a", asset_selection=steps[:1]).success
        assert sorted(p.name for p in crops_dir(settings.output_path, "a").iterdir()) == ["meta.json"]
        plan = plan_build(instance, builds["raw"]["defs"], settings, list(CLASSES), force=False)
        assert plan.classes == [], plan.describe(10, 0)

        assert job.execute_in_process(instance=instance, partition_key="a", asset_selection=steps[1:]).success
        assert set(read_latents(settings.output_path, "a")[1]) == {"latent"}
        assert isinstance(read_crops(settings.output_path, "b")[1], np.ndarray)
        assert np.asarray(read_crops(settings.output_path, "a")[1]).shape == (CLASSES["a"], 256, 256, 3)
        final = build_definitions(settings, partitions_per_run=10).resolve_implicit_global_asset_job_def()
        rebuilt = final.execute_in_process(
            instance=instance, raise_on_error=False,
            asset_selection=[dg.AssetKey(k) for k in ("quantization_stats", "probe_features", "latent_probe")],
        )
        assert rebuilt.success, failures(rebuilt)
        assert set(_metadata(instance, "probe_features")["feature_sets"]) == {"sample"}  # class a has no posterior
    finally:
        job = build_definitions(settings, partitions_per_run=10).resolve_implicit_global_asset_job_def()
        assert job.execute_in_process(instance=instance, partition_key="a", asset_selection=steps).success


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["raw", "none"])
def test_crops_then_latents_in_separate_runs_give_the_one_step_bytes(builds, tmp_path, mode):
    """A build crops while it encodes (crops_and_latents, one pass over the source). The same
    source cropped first (preprocessed_crops alone), then encoded from the stored crops
    (vae_latents alone, which recomputes and verifies ``none`` crops): the same crop files or
    hashes, the same float latents and the same dataset bytes; and the separate runs say so in
    their metadata (crops_streamed only where the stored crops were recomputed)."""
    fused = builds[mode]["settings"]
    settings = ImagenetInt8Settings(**{**fused.model_dump(), "output": str(tmp_path / "out")})
    job = build_definitions(settings, partitions_per_run=10).resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.ephemeral()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    tags = {"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "b"}
    for selection in (["preprocessed_crops"], ["vae_latents"], ["mds_shards"], list(FINAL)):
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in selection], raise_on_error=False,
            tags=tags if selection != list(FINAL) else None,
        )
        assert result.success, (selection, failures(result))
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert materialized == set(selection), (selection, materialized)  # a subset of the one step
    for key in CLASSES:
        one_ids, one_crops, one_meta = read_crops_with_meta(fused.output_path, key)
        ids, crops_back, meta = read_crops_with_meta(settings.output_path, key)
        assert ids == one_ids and np.array_equal(np.asarray(crops_back), np.asarray(one_crops))
        assert meta.get("sha256") == one_meta.get("sha256") and meta.get("failed") == one_meta.get("failed")
        one = read_latents(fused.output_path, key)[1]
        apart = read_latents(settings.output_path, key)[1]
        assert set(one) == set(apart) and all(one[k].tobytes() == apart[k].tobytes() for k in one)
        assert _metadata(instance, "vae_latents", key)["crops_streamed"] is (mode == "none")
        assert _metadata(builds[mode]["instance"], "vae_latents", key)["crops_streamed"] is True
    assert _dataset_files(settings.output_path) == _dataset_files(fused.output_path)
