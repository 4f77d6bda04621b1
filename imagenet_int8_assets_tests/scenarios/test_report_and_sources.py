"""The quality assets through Dagster: the reconstruction check's severities and a CIFAR-10 source."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import numpy as np
import pytest

from imagenet_int8_assets.core.crops.crop_store import read_crops
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets.build.stages import DATASET_STEPS
from imagenet_int8_assets_tests.support.builds import make_image_folder, materialize_all
from imagenet_int8_assets_tests.core.source.test_cifar import LABEL_NAMES, full_train_batches, make_cifar


def _settings(source, out, **options):
    return ImagenetInt8Settings(source=str(source), output=str(out), vae="tiny-random", device="cpu", workers=1, **options)


def _check(result, name):
    return next(
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == name
    )


@pytest.mark.slow
def test_reconstruction_check_warns_by_default_and_blocks_when_asked(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    instance = dg.DagsterInstance.ephemeral()
    lenient = build_definitions(_settings(source, tmp_path / "out", report_per_class=2), partitions_per_run=10)
    assert all(r.success for r in materialize_all(lenient, instance))
    passed = _check(materialize_all(lenient, instance)[-1], "reconstruction_quality")
    assert passed.passed

    # a range far too narrow for the latents (+-0.2): most values clip, and the codes lose PSNR
    narrow = {"report_per_class": 2, "quant_range": 0.2, "report_max_psnr_gap": 0.0, "report_max_clip_fraction": 0.0}
    assert all(r.success for r in materialize_all(build_definitions(_settings(source, tmp_path / "narrow", **narrow)), instance))
    # the setting is resolved once, when the latents are made: they record it, and the dataset says the same
    from imagenet_int8_assets.core.latents.latent_store import read_latents

    assert "quant_range" not in read_latents(tmp_path / "narrow", "a")[2]  # the codes record it, not the latents
    assert json.loads((tmp_path / "narrow" / "mds" / "build.json").read_text())["quant_range"] == 0.2
    for blocking, severity in ((False, dg.AssetCheckSeverity.WARN), (True, dg.AssetCheckSeverity.ERROR)):
        defs = build_definitions(_settings(source, tmp_path / "narrow", report_blocking=blocking, **narrow), partitions_per_run=10)
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in DATASET_STEPS], raise_on_error=False
        )
        check = _check(result, "reconstruction_quality")
        assert not check.passed and check.severity == severity
        assert "dB PSNR" in check.description and "clipped" in check.description
        # a WARN leaves the run green; an ERROR blocks the steps after the report
        assert result.success is (not blocking)


def _report_metadata(result) -> dict:
    (event,) = [
        e for e in result.all_events
        if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key == dg.AssetKey("reconstruction_report")
    ]
    return {k: getattr(v, "value", v) for k, v in event.event_specific_data.materialization.metadata.items()}


def _report_files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "report").iterdir()) if p.is_file()}


def _logs(instance, result, steps) -> list:
    return [e for e in instance.all_logs(result.run_id) if e.step_key in steps and e.user_message]


@pytest.mark.slow
def test_report_decodes_only_the_classes_that_changed_and_matches_a_report_from_scratch(tmp_path):
    """A class rebuilt with another image is decoded again, the others come from the report's
    cache, and the files are byte for byte those of a report decoded from scratch. Classes not
    published yet are left out at INFO with the steps that bring them in; the probe's notes are
    INFO too (no WARNING from the quality and probe steps of an ordinary build)."""
    import logging

    from imagenet_int8_assets.sample import synthetic_picture

    source = make_image_folder(tmp_path / "src", {"a": 4, "b": 4, "c": 4})
    out = tmp_path / "out"
    # 2 images per class, a 3-tile grid: the first class keeps 2 images for the grid, the next ones 1
    settings = _settings(source, out, report_per_class=2, report_grid_images=3)
    defs = build_definitions(settings, partitions_per_run=10)
    instance = dg.DagsterInstance.ephemeral()
    built = materialize_all(defs, instance)
    assert all(r.success for r in built)
    assert {"classes_decoded": 3, "classes_reused": 0}.items() <= _report_metadata(built[-1]).items()
    job = defs.resolve_implicit_global_asset_job_def()

    def run(*steps, partition=None):
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in steps], partition_key=partition,
            raise_on_error=False,
        )
        assert result.success
        return result

    # class b gets a fifth image and a class d appears; b is rebuilt, d is not built yet
    synthetic_picture(300, 240, (10, 200, 30), seed=12345).save(source / "b" / "b_9999.JPEG", quality=90)
    make_image_folder(tmp_path / "src-d", {"d": 4})
    (tmp_path / "src-d" / "d").rename(source / "d")
    run("raw_manifest")
    run("preprocessed_crops", "vae_latents", "mds_shards", partition="b")
    report = run("reconstruction_report")
    metadata = _report_metadata(report)
    assert metadata["classes_decoded"] == 0 and metadata["classes_reused"] == 2  # a and c
    skipped = metadata["skipped_classes"]
    assert skipped.keys() == {"b", "d"}
    assert "latents (5) differ from its 4 published samples" in skipped["b"]
    assert "materialize mds_dataset, then reconstruction_report" in skipped["b"]  # its shards are rebuilt
    assert "preprocessed_crops, vae_latents and mds_shards for class 'd', then mds_dataset" in skipped["d"]
    lines = _logs(instance, report, {"reconstruction_report"})
    left_out = [e for e in lines if "not in the report" in e.user_message]
    assert len(left_out) == 2 and all(e.level == logging.INFO for e in left_out)

    run("preprocessed_crops", "vae_latents", "mds_shards", partition="d")
    dataset = run(*DATASET_STEPS)
    assert {"classes_decoded": 2, "classes_reused": 2}.items() <= _report_metadata(dataset).items()  # b and d
    assert "skipped_classes" not in _report_metadata(dataset)
    lines = _logs(instance, dataset, {"reconstruction_report", "probe_features", "latent_probe"})
    assert [e.user_message for e in lines if e.level >= logging.WARNING] == []
    assert any(e.step_key == "latent_probe" and "HistGradientBoosting" in e.user_message for e in lines)
    incremental = _report_files(out)
    assert len(incremental["metrics.csv"].decode("utf-8").splitlines()) == 1 + 4 * 2

    # from scratch: the same bytes
    shutil.rmtree(out / "report")
    assert _report_metadata(run("reconstruction_report"))["classes_decoded"] == 4
    assert _report_files(out) == incremental
    # a damaged entry and a foreign one (another class's entry under c's name) are decoded again
    cache = out / "report" / "cache"
    (cache / "a.npz").write_bytes(b"\x00" * 100)
    shutil.copyfile(cache / "b.npz", cache / "c.npz")
    assert {"classes_decoded": 2, "classes_reused": 2}.items() <= _report_metadata(run("reconstruction_report")).items()
    assert _report_files(out) == incremental


@pytest.mark.slow
def test_cifar10_python_folder_is_a_source_with_classes_as_partitions(tmp_path):
    folder = tmp_path / "downloads" / "cifar-10-batches-py"
    written = make_cifar(folder, full_train_batches())
    settings = _settings(tmp_path / "downloads", tmp_path / "out")
    defs = build_definitions(settings, partitions_per_run=10)
    instance = dg.DagsterInstance.ephemeral()
    results = materialize_all(defs, instance)  # the manifest run exports the split and registers its classes
    assert all(r.success for r in results)
    keys = defs.resolve_assets_def("preprocessed_crops").partitions_def.get_partition_keys(dynamic_partitions_store=instance)
    train_labels = [label for name, (_, labels) in written.items() if name != "test_batch" for label in labels]
    assert sorted(keys) == sorted({LABEL_NAMES[i] for i in train_labels})
    ds = open_dataset(settings.output_path / "mds")
    assert len(ds) == len(train_labels) == 35
    samples = [ds[i] for i in range(len(ds))]
    assert sorted(s["label"] for s in samples) == sorted(train_labels)
    assert all(s["label_as_text"] == LABEL_NAMES[s["label"]] for s in samples)
    assert samples[0]["latent"].shape == (4, 32, 32)  # 32x32 images upsampled to the 256 crop
    ids, crops = read_crops(settings.output_path, keys[0])
    assert crops.shape[1:] == (256, 256, 3) and all(i.startswith(f"{keys[0]}/train_") for i in ids)
    assert np.ptp(crops[0]) > 0


@pytest.mark.slow
def test_cifar10_hostile_label_names_stay_labels_and_never_become_paths(tmp_path):
    """batches.meta naming classes '../../a' and '/b': the dataset keeps those texts as labels and
    every exported file stays inside the output."""
    import pickle

    folder = tmp_path / "downloads" / "cifar-10-batches-py"
    written = make_cifar(folder, {**{f"data_batch_{i}": 3 for i in range(1, 6)}, "test_batch": 2})
    names = ["../../a", "/b", *LABEL_NAMES[2:]]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": 10000}, fh)
    before = {p for p in tmp_path.rglob("*")}
    settings = _settings(tmp_path / "downloads", tmp_path / "out")
    results = materialize_all(build_definitions(settings, partitions_per_run=10), dg.DagsterInstance.ephemeral())
    assert all(r.success for r in results)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(tmp_path / "out") for p in created)
    train_labels = [label for name, (_, labels) in written.items() if name != "test_batch" for label in labels]
    ds = open_dataset(settings.output_path / "mds")
    samples = [ds[i] for i in range(len(ds))]
    assert sorted(s["label"] for s in samples) == sorted(train_labels)
    assert all(s["label_as_text"] == names[s["label"]] for s in samples)
    assert {s["label_as_text"] for s in samples} & {"../../a", "/b"}
