"""The quality assets through Dagster: the reconstruction check's severities and a CIFAR-10 source."""

from __future__ import annotations

import dagster as dg
import numpy as np

from imagenet_int8_assets.cli import FINAL_STEPS
from imagenet_int8_assets.core.storage import read_crops
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.reader import open_dataset
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.conftest import make_image_folder, materialize_all
from imagenet_int8_assets_tests.test_core_cifar import LABEL_NAMES, full_train_batches, make_cifar


def _settings(source, out, **options):
    return ImagenetInt8Settings(source=str(source), output=str(out), vae="tiny-random", device="cpu", workers=1, **options)


def _check(result, name):
    return next(
        e.event_specific_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and e.event_specific_data.check_name == name
    )


def test_reconstruction_check_warns_by_default_and_blocks_when_asked(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    instance = dg.DagsterInstance.ephemeral()
    lenient = build_definitions(_settings(source, tmp_path / "out", report_per_class=2), partitions_per_run=10)
    assert all(r.success for r in materialize_all(lenient, instance))
    passed = _check(materialize_all(lenient, instance)[-1], "reconstruction_quality")
    assert passed.passed

    # impossible thresholds: a negative PSNR gap and no clipping allowed at all
    strict = {"report_per_class": 2, "report_max_psnr_gap": -1.0, "report_max_clip_fraction": -0.1}
    for blocking, severity in ((False, dg.AssetCheckSeverity.WARN), (True, dg.AssetCheckSeverity.ERROR)):
        defs = build_definitions(_settings(source, tmp_path / "out", report_blocking=blocking, **strict), partitions_per_run=10)
        job = defs.resolve_implicit_global_asset_job_def()
        result = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey(k) for k in FINAL_STEPS], raise_on_error=False
        )
        check = _check(result, "reconstruction_quality")
        assert not check.passed and check.severity == severity
        assert "dB PSNR" in check.description and "clipped" in check.description
        # a WARN leaves the run green; an ERROR blocks the steps after the report
        assert result.success is (not blocking)


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
