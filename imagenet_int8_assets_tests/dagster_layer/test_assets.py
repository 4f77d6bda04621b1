"""The Dagster layer on small generated datasets: partitions, checks that block, clear failures."""

from __future__ import annotations

import re

import dagster as dg
import pytest
import torch

from imagenet_int8_assets.build.run_events import error_text
from imagenet_int8_assets.core.dataset.mds_index import class_home, read_class_index
from imagenet_int8_assets.core.source.sources import SourceError
from imagenet_int8_assets.core.common.layout import mds_root
from imagenet_int8_assets.core.latents.vae import load_vae
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.resources import ImagenetInt8Settings, SettingsError, max_partitions_per_run
from imagenet_int8_assets_tests.support.builds import make_image_folder, materialize_all

PARTITIONED = ("preprocessed_crops", "vae_latents", "mds_shards")


def _setup(tmp_path, classes, **settings_kw):
    source = make_image_folder(tmp_path / "src", classes)
    options = {"vae": "tiny-random", "device": "cpu", "workers": 1, **settings_kw}
    settings = ImagenetInt8Settings(source=str(source), output=str(tmp_path / "out"), **options)
    return settings, build_definitions(settings, partitions_per_run=10), dg.DagsterInstance.ephemeral()


def _failed_steps(result) -> dict[str, str]:
    return {
        e.step_key: error_text(e.event_specific_data.error)
        for e in result.all_events
        if e.event_type_value == "STEP_FAILURE"
    }


def _check_results(result) -> dict[str, bool]:
    """Per check: whether it passed for every class (a batched run records one result per class)."""
    passed: dict[str, bool] = {}
    for e in result.all_events:
        if e.event_type_value == "ASSET_CHECK_EVALUATION":
            data = e.event_specific_data
            passed[data.check_name] = passed.get(data.check_name, True) and data.passed
    return passed


def test_partitions_are_the_class_folders_and_the_graph_is_linked(tmp_path):
    _, defs, instance = _setup(tmp_path, {"n01440764": 1, "zebra": 1, "apple": 1})
    partitions = defs.resolve_assets_def("vae_latents").partitions_def
    assert partitions.get_partition_keys(dynamic_partitions_store=instance) == []  # nothing scanned at load
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    assert sorted(partitions.get_partition_keys(dynamic_partitions_store=instance)) == ["apple", "n01440764", "zebra"]
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()}
    assert parents == {
        "raw_manifest": set(),
        "source_class_files": set(),
        "preprocessed_crops": {"raw_manifest", "source_class_files"},
        "vae_latents": {"preprocessed_crops"},
        "quantization_stats": {"vae_latents"},
        "mds_shards": {"vae_latents", "raw_manifest"},
        "mds_dataset": {"mds_shards", "quantization_stats"},
        "reconstruction_report": {"mds_dataset", "quantization_stats"},
        "probe_features": {"vae_latents"},
        "latent_probe": {"probe_features"},
    }
    for key in graph.get_all_asset_keys():
        assert graph.get(key).description
    # the UI renders descriptions as Markdown: a placeholder such as <class> outside a code span is
    # an HTML tag there (it showed "latents//latents.npz")
    texts = {k.to_user_string(): graph.get(k).description for k in graph.get_all_asset_keys()}
    texts.update({spec.name: spec.description for checks in defs.asset_checks or [] for spec in checks.check_specs})
    texts.update({s.name: s.description for s in defs.sensors or []})
    for name, text in texts.items():
        assert not re.search(r"<[A-Za-z]", re.sub(r"`[^`]*`", "", text or "")), (name, text)
    # hub_upload is in the graph only with a Hub repository to publish to ("Materialize all" ends green)
    settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", hub_repo="me/data")
    graph = build_definitions(settings).resolve_asset_graph()
    hub = graph.get(dg.AssetKey("hub_upload"))
    assert {p.to_user_string() for p in hub.parent_keys} == {"mds_dataset", "quantization_stats", "reconstruction_report"}


@pytest.mark.parametrize("per_run", [1, 10])  # 1: the empty class alone in its run, nothing to crop at all
def test_empty_class_is_an_empty_partition_not_an_error(tmp_path, per_run):
    settings, defs, instance = _setup(tmp_path, {"full": 2})
    (tmp_path / "src" / "empty").mkdir()
    defs = build_definitions(settings, partitions_per_run=per_run)
    results = materialize_all(defs, instance, partitions_per_run=per_run)
    assert all(r.success for r in results)
    assert read_class_index(mds_root(settings.output_path), "empty")["shards"] == []
    assert instance.get_latest_materialization_event(dg.AssetKey("mds_dataset")).asset_materialization.metadata["samples"].value == 2
    probe = instance.get_latest_materialization_event(dg.AssetKey("latent_probe")).asset_materialization.metadata
    assert probe["status"].value.startswith("skipped: the probe needs at least 4 latents in each of at least 2 classes")


def test_non_finite_latents_block_the_shards(tmp_path):
    """A VAE whose weights overflow: the blocking check stops the run before MDS is written."""
    model = load_vae("tiny-random").model
    with torch.no_grad():
        model.quant_conv.bias[0] = float("nan")
    model.save_pretrained(tmp_path / "nan-vae")
    settings, defs, instance = _setup(tmp_path, {"a": 2, "b": 1}, vae=str(tmp_path / "nan-vae"))
    results = materialize_all(defs, instance)
    batch = results[1]
    assert not batch.success
    assert _check_results(batch) == {"latents_are_finite": False}
    assert "latents_are_finite" in " ".join(_failed_steps(batch))
    assert not class_home(mds_root(settings.output_path), "a").exists()
    assert instance.get_latest_materialization_event(dg.AssetKey("mds_dataset")) is None
    # the statistics still run and say how many values were unusable instead of turning NaN
    stats = instance.get_latest_materialization_event(dg.AssetKey("quantization_stats")).asset_materialization
    assert stats.metadata["non_finite_values"].value == 3 * 32 * 32  # channel 0 of 3 images


def test_count_check_blocks_when_files_change_after_the_manifest(tmp_path):
    settings, defs, instance = _setup(tmp_path, {"a": 3, "b": 2})
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    (tmp_path / "src" / "a" / "a_0001.JPEG").write_bytes(b"corrupted after the scan")
    result = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey(k) for k in PARTITIONED],
        tags={"dagster/asset_partition_range_start": "a", "dagster/asset_partition_range_end": "b"},
        raise_on_error=False,
    )
    assert _check_results(result) == {"latents_are_finite": True, "mds_count_matches_manifest": False}
    crops = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("preprocessed_crops"), asset_partitions=["a"]), limit=1
    ).records[0]
    assert crops.asset_materialization.metadata["failed"].value == 1
    assert "a_0001.JPEG" in crops.asset_materialization.metadata["failures"].value
    final = job.execute_in_process(
        instance=instance,
        asset_selection=[dg.AssetKey("quantization_stats"), dg.AssetKey("mds_dataset")],
        raise_on_error=False,
    )
    assert not final.success
    assert "a (2 written, 3 ok)" in _failed_steps(final)["mds_dataset"]


@pytest.mark.slow
def test_dataset_refuses_classes_built_with_different_settings(tmp_path):
    settings, defs, instance = _setup(tmp_path, {"a": 1, "b": 1})
    assert all(r.success for r in materialize_all(defs, instance))
    adm_settings = ImagenetInt8Settings(
        source=settings.source, output=settings.output, vae="tiny-random", device="cpu", workers=1, crop_recipe="adm"
    )
    adm = build_definitions(adm_settings, partitions_per_run=10)
    job = adm.resolve_implicit_global_asset_job_def()
    refused = job.execute_in_process(
        instance=instance, partition_key="b", asset_selection=[dg.AssetKey(k) for k in PARTITIONED], raise_on_error=False
    )
    assert "IMAGENET_INT8_CROP_RECIPE: the output holds 'imagenet.int8', this launch has 'adm'" in _failed_steps(refused)["crops_and_latents"]
    # An output whose settings record is gone (or predates it): the dataset itself still refuses a mix
    (settings.output_path / "settings.json").unlink()
    assert job.execute_in_process(
        instance=instance, partition_key="b", asset_selection=[dg.AssetKey(k) for k in PARTITIONED]
    ).success
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("mds_dataset")], raise_on_error=False)
    message = _failed_steps(result)["mds_dataset"]
    assert "[b]" in message and "crops.recipe=adm" in message and "Re-materialize" in message


def test_missing_upstream_says_what_to_materialize(tmp_path):
    _, defs, instance = _setup(tmp_path, {"a": 1})
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    result = job.execute_in_process(
        instance=instance, partition_key="a", asset_selection=[dg.AssetKey("vae_latents")], raise_on_error=False
    )
    assert "Materialize the 'preprocessed_crops' asset" in _failed_steps(result)["crops_and_latents"]


def test_settings_errors_name_the_variable(tmp_path):
    missing = ImagenetInt8Settings(source=str(tmp_path / "missing"), output=str(tmp_path / "out"))
    build_definitions(missing)  # loading never scans the source, so it loads
    with pytest.raises(SourceError, match="IMAGENET_INT8_SOURCE"):
        missing.preflight()  # the manifest's (and the CLI's) first check
    with pytest.raises(SettingsError, match="IMAGENET_INT8_CROP_RECIPE"):
        ImagenetInt8Settings.from_env({"IMAGENET_INT8_CROP_RECIPE": "squash"})
    with pytest.raises(SettingsError, match="IMAGENET_INT8_BATCH_SIZE"):
        ImagenetInt8Settings.from_env({"IMAGENET_INT8_BATCH_SIZE": "many"})
    with pytest.raises(SettingsError, match="IMAGENET_INT8_MAX_PARTITIONS_PER_RUN"):
        max_partitions_per_run({"IMAGENET_INT8_MAX_PARTITIONS_PER_RUN": "0"})
    settings = ImagenetInt8Settings.from_env({"IMAGENET_INT8_SEED": "7", "IMAGENET_INT8_VAE": "tiny-random"})
    assert settings.seed == 7 and settings.vae == "tiny-random" and settings.is_sample


@pytest.mark.slow
def test_report_before_a_new_class_is_published_reports_on_the_published_dataset(tmp_path):
    """Automation can run the report on a new quantization_stats materialization before
    mds_dataset publishes a new class (CI saw IndexError: the new class's offset past the end)."""
    settings, defs, instance = _setup(tmp_path, {"a": 2, "b": 3}, report_per_class=2)
    assert all(r.success for r in materialize_all(defs, instance))
    make_image_folder(tmp_path / "src", {"ab": 2}, size=(260, 280))  # sorts between a and b
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    assert job.execute_in_process(
        instance=instance, partition_key="ab", asset_selection=[dg.AssetKey(k) for k in PARTITIONED]
    ).success
    report = job.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("quantization_stats"), dg.AssetKey("reconstruction_report")],
        raise_on_error=False,
    )
    assert report.success, _failed_steps(report)
    meta = instance.get_latest_materialization_event(dg.AssetKey("reconstruction_report")).asset_materialization.metadata
    assert meta["images"].value == 4  # 2 per class of the published a and b
    assert set(meta["skipped_classes"].value) == {"ab"}
    assert "not in the published dataset yet" in meta["skipped_classes"].value["ab"]

    # b re-made with as many images (one replaced) but not published: its new latents are not what the
    # published codes came from, so the report leaves it out instead of comparing the two
    image = sorted((tmp_path / "src" / "b").iterdir())[0]
    image.unlink()
    make_image_folder(tmp_path / "other", {"b": 1}, size=(250, 250))
    (tmp_path / "other" / "b" / "b_0000.JPEG").rename(image.with_name("b_new.JPEG"))
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    assert job.execute_in_process(
        instance=instance, partition_key="b", asset_selection=[dg.AssetKey(k) for k in PARTITIONED]
    ).success
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("reconstruction_report")]).success
    meta = instance.get_latest_materialization_event(dg.AssetKey("reconstruction_report")).asset_materialization.metadata
    assert set(meta["skipped_classes"].value) == {"ab", "b"} and meta["images"].value == 2
    assert "rebuilt since the dataset was published" in meta["skipped_classes"].value["b"]
    assert "mds_dataset" in meta["skipped_classes"].value["b"]


def test_the_scan_observes_each_class_with_its_file_counts(tmp_path):
    settings, defs, instance = _setup(tmp_path, {"a": 3, "b": 1})
    (tmp_path / "src" / "a" / "broken.JPEG").write_bytes(b"\xff\xd8\xff not a jpeg")
    (tmp_path / "src" / "empty").mkdir()
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    seen = {}
    for key in ("a", "b", "empty"):
        records = instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("source_class_files"), asset_partitions=[key]), limit=5
        ).records
        assert len(records) == 1, key
        meta = records[0].asset_observation.metadata
        seen[key] = (meta["files"].value, meta["ok"].value)
    assert seen == {"a": (4, 3), "b": (1, 1), "empty": (0, 0)}
