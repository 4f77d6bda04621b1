"""Operating the graph as Dagster users do: live class partitions (sensor), versions and
staleness (through GraphQL), declarative automation and the refresh schedule, incremental CLI
builds, one set of settings per output. Real instances, the real CLI, real GraphQL; no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.partitions import CLASS_PARTITIONS, registered_classes
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import BIN, REPO, cli_env, encoded_classes, make_image_folder, materialize_all, run_cli

CLASS_ASSETS = ("preprocessed_crops", "vae_latents", "mds_shards")


def _settings(tmp_path: Path, source: Path, **extra) -> ImagenetInt8Settings:
    return ImagenetInt8Settings(
        source=str(source), output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1, **extra
    )


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def _run_manifest(defs: dg.Definitions, instance: dg.DagsterInstance):
    job = defs.resolve_implicit_global_asset_job_def()
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")])
    assert result.success
    # the step also records the first scan of each class as source_class_files materializations
    manifest = dg.AssetKey("raw_manifest")
    return next(m for m in result.asset_materializations_for_node("raw_manifest") if m.asset_key == manifest).metadata


def _touch(path: Path) -> None:
    """A new modification time (the content stays): the class's data version changes."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# ------------------------------------------------------------------------------------------
# loading the definitions


@pytest.mark.slow
def test_loading_the_definitions_scans_nothing_and_writes_nothing(tmp_path):
    """The sample source and a missing source load alike, instantly, and leave no file behind."""
    out = tmp_path / "out"
    for source in ("sample", str(tmp_path / "not-there")):
        env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=source, DAGSTER_HOME=str(tmp_path / "home"))
        code = (
            "import imagenet_int8_assets as m; d = m.defs; "
            "print(sorted(k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys()))"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "source_class_files" in proc.stdout and "mds_dataset" in proc.stdout
        assert not out.exists() and not (tmp_path / "home").exists()
        assert _tree(tmp_path) == set()


# ------------------------------------------------------------------------------------------
# the class_folders sensor


def test_class_folders_sensor_registers_new_folders_and_requests_a_scan(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions

    source = make_image_folder(tmp_path / "src", {"a": 1, "b": 1})
    settings = _settings(tmp_path, source)
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("class_folders")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    with dg.instance_for_test() as instance:

        def tick():  # the settings resource is a context manager (it locks the output in runs): as the daemon does
            with dg.build_sensor_context(instance=instance, resources={"settings": settings}) as context:
                return sensor.evaluate_tick(context)

        first = tick()
        assert [r.partition_keys for r in first.dynamic_partitions_requests] == [["a", "b"]]
        assert len(first.run_requests) == 1 and first.run_requests[0].asset_selection == [dg.AssetKey("raw_manifest")]
        for request in first.dynamic_partitions_requests:  # what the daemon does with the result
            instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        assert "all registered" in tick().skip_message

        make_image_folder(source, {"c": 1})  # a new class folder, and one that vanishes
        second = tick()
        assert [r.partition_keys for r in second.dynamic_partitions_requests] == [["c"]]
        assert second.run_requests[0].run_key != first.run_requests[0].run_key
        instance.add_dynamic_partitions(CLASS_PARTITIONS, ["c"])
        assert registered_classes(instance) == ["a", "b", "c"]


def test_sensor_prepares_the_bundled_sample_through_the_manifest(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions

    settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1)
    sensor = build_definitions(settings).resolve_sensor_def("class_folders")
    with dg.instance_for_test() as instance:
        with dg.build_sensor_context(instance=instance, resources={"settings": settings}) as context:
            result = sensor.evaluate_tick(context)
    assert len(result.run_requests) == 1 and not (tmp_path / "out").exists()  # the scan prepares it, not the sensor


# ------------------------------------------------------------------------------------------
# versions, staleness, automation


STALE_QUERY = """
query Stale($key: AssetKeyInput!, $partitions: [String!]) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      opVersion
      staleStatusByPartition(partitions: $partitions)
      staleCausesByPartition(partitions: $partitions) { reason category key { path } partitionKey }
    }
  }
}
"""


CHECKS_QUERY = """
query Checks($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode { assetChecksOrError { ... on AssetChecks { checks { name
      partitionStatuses { ... on AssetCheckDefaultPartitionStatuses {
        succeededPartitions failedPartitions skippedPartitions } } } } } }
  }
}
"""


def _graphql(instance, query: str, variables: dict) -> dict:
    """Dagster's own GraphQL schema over a code server that loads the definitions from the
    environment, as `dagster dev` does."""
    from dagster_graphql.test.utils import define_out_of_process_context, execute_dagster_graphql

    with define_out_of_process_context(str(REPO / "imagenet_int8_assets" / "definitions.py"), "defs", instance) as ctx:
        with ctx:  # what the webserver does per request: dynamic partitions load from the instance
            result = execute_dagster_graphql(ctx, query, variables)
    assert not result.errors, result.errors
    return result.data


def _stale(instance, asset: str, partitions: list[str]) -> dict[str, tuple[str, list[str]]]:
    """{partition: (status, [cause reason with its asset])} through GraphQL."""
    result_data = _graphql(instance, STALE_QUERY, {"key": {"path": [asset]}, "partitions": partitions})
    result = type("R", (), {"data": result_data})
    node = result.data["assetNodeOrError"]
    return {
        p: (status, [f"{c['key']['path'][0]}: {c['reason']}" for c in causes])
        for p, status, causes in zip(partitions, node["staleStatusByPartition"], node["staleCausesByPartition"])
    }


@pytest.mark.slow
def test_staleness_settings_change_and_one_class_change_through_graphql(tmp_path, monkeypatch):
    from imagenet_int8_assets.definitions import build_definitions

    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    settings = _settings(tmp_path, source)
    for name, value in {"SOURCE": str(source), "OUTPUT": settings.output, "VAE": "tiny-random", "DEVICE": "cpu"}.items():
        monkeypatch.setenv(f"IMAGENET_INT8_{name}", value)
    with dg.instance_for_test() as instance:
        assert all(r.success for r in materialize_all(build_definitions(settings), instance))
        for asset, check in (("vae_latents", "latents_are_finite"), ("mds_shards", "mds_count_matches_manifest")):
            node = _graphql(instance, CHECKS_QUERY, {"key": {"path": [asset]}})["assetNodeOrError"]
            (found,) = [c for c in node["assetChecksOrError"]["checks"] if c["name"] == check]
            # one batched run checked both classes: each shows as passed, none as skipped
            assert found["partitionStatuses"] == {"succeededPartitions": ["a", "b"], "failedPartitions": [], "skippedPartitions": []}
        fresh = _stale(instance, "vae_latents", ["a", "b"])
        assert fresh == {"a": ("FRESH", []), "b": ("FRESH", [])}

        _touch(next((source / "a").iterdir()))  # one class's files change
        metadata = _run_manifest(build_definitions(settings), instance)
        assert metadata["changed_classes"].value == 1 and metadata["decoded_files"].value == 1
        crops = _stale(instance, "preprocessed_crops", ["a", "b"])
        assert crops["a"][0] == "STALE" and crops["a"][1] == ["source_class_files: has a new data version"]
        assert crops["b"] == ("FRESH", [])

        monkeypatch.setenv("IMAGENET_INT8_PRECISION", "bf16")  # a setting that changes the latents' bytes
        # while the output records fp32 the code location refuses launches and shows the recorded code
        # versions: nothing looks changed, nothing invites a re-materialization that would be refused
        assert _stale(instance, "vae_latents", ["a", "b"]) == {"a": ("FRESH", []), "b": ("FRESH", [])}
        from imagenet_int8_assets.resources import ImagenetInt8Settings

        ImagenetInt8Settings.from_env().record_settings(replace=True)  # what `imagenet-int8 build --force` records
        latents = _stale(instance, "vae_latents", ["a", "b"])
        assert {status for status, _ in latents.values()} == {"STALE"}
        assert all(causes == ["vae_latents: has a new code version"] for _, causes in latents.values())
        assert _stale(instance, "mds_shards", ["b"])["b"] == ("FRESH", [])  # not affected by the precision


@pytest.mark.slow
def test_automation_requests_exactly_the_new_and_changed_classes_then_the_dataset(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions

    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 1})
    settings = _settings(tmp_path, source)
    defs = build_definitions(settings)
    assert defs.resolve_sensor_def("build_automation").default_status == dg.DefaultSensorStatus.STOPPED
    with dg.instance_for_test() as instance:
        assert all(r.success for r in materialize_all(defs, instance))
        quiet = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert quiet.total_requested == 0
        _touch(next((source / "b").iterdir()))
        make_image_folder(source, {"d": 1})
        _run_manifest(defs, instance)  # what the sensor's (or the schedule's) scan does
        result = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=quiet.cursor)
        requested = {
            key.to_user_string(): sorted(result.get_requested_partitions(key)) if key.to_user_string() in CLASS_ASSETS else True
            for key in (dg.AssetKey(k) for k in CLASS_ASSETS)
            if result.get_num_requested(key)
        }
        assert requested == {"preprocessed_crops": ["b", "d"], "vae_latents": ["b", "d"], "mds_shards": ["b", "d"]}
        assert result.get_num_requested(dg.AssetKey("mds_dataset")) == 0  # waits for the classes


def test_refresh_schedule_rescans_at_its_tick(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions

    settings = _settings(tmp_path, make_image_folder(tmp_path / "src", {"a": 1}), refresh_cron="15 4 * * *")
    defs = build_definitions(settings)
    schedule = defs.resolve_schedule_def("refresh_source")
    assert schedule.cron_schedule == "15 4 * * *" and schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    with dg.instance_for_test() as instance:
        data = schedule.evaluate_tick(dg.build_schedule_context(instance=instance, resources={"settings": settings}))
    assert len(data.run_requests) == 1
    assert defs.resolve_job_def(schedule.job_name).asset_layer.selected_asset_keys == {dg.AssetKey("raw_manifest")}


# ------------------------------------------------------------------------------------------
# incremental `imagenet-int8 build` and one set of settings per output


def _dataset_bytes(out: Path) -> dict[str, bytes]:
    from imagenet_int8_assets.core.dataset.mds_index import read_published_index

    root = out / "mds"
    index = read_published_index(root)
    return {s["raw_data"]["basename"]: (root / s["raw_data"]["basename"]).read_bytes() for s in index["shards"]}


@pytest.mark.slow
def test_incremental_build_encodes_only_what_changed_and_force_rebuilds(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=str(source))
    imagenet_int8 = str(BIN / "imagenet-int8")
    out = tmp_path / "out"

    first = run_cli([imagenet_int8, "build"], env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    assert encoded_classes(out) == {"a": 1, "b": 1, "c": 1}

    again = run_cli([imagenet_int8, "build"], env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 of 3 class(es) to build" in again.stdout + again.stderr
    assert encoded_classes(out) == {"a": 1, "b": 1, "c": 1}

    changed = source / "b" / "b_0000.JPEG"
    make_image_folder(tmp_path / "other", {"b": 1}, size=(200, 320))
    changed.write_bytes((tmp_path / "other" / "b" / "b_0000.JPEG").read_bytes())
    third = run_cli([imagenet_int8, "build"], env, cwd=tmp_path)
    assert third.returncode == 0, third.stderr[-4000:]
    assert "1 of 3 class(es) to build" in third.stdout + third.stderr
    assert encoded_classes(out) == {"a": 1, "b": 2, "c": 1}

    clean_env = cli_env(tmp_path / "clean", IMAGENET_INT8_SOURCE=str(source))
    clean = run_cli([imagenet_int8, "build"], clean_env, cwd=tmp_path)
    assert clean.returncode == 0, clean.stderr[-4000:]
    assert _dataset_bytes(out) == _dataset_bytes(tmp_path / "clean" / "out")

    forced = run_cli([imagenet_int8, "build", "--force"], env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert encoded_classes(out) == {"a": 2, "b": 3, "c": 2}


@pytest.mark.slow
def test_a_launch_with_other_settings_is_refused_with_the_differences(tmp_path):
    source = make_image_folder(tmp_path / "src", {"a": 1})
    env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=str(source))
    imagenet_int8 = str(BIN / "imagenet-int8")
    assert run_cli([imagenet_int8, "build"], env, cwd=tmp_path).returncode == 0
    recorded = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert recorded["vae"] == "tiny-random" and recorded["crop_size"] == 256

    refused = run_cli([imagenet_int8, "build", "--precision", "bf16"], env, cwd=tmp_path)
    assert refused.returncode == 2
    assert "IMAGENET_INT8_PRECISION: the output holds 'fp32', this launch has 'bf16'" in refused.stderr
    assert "imagenet-int8 build --force" in refused.stderr

    # `dagster asset materialize` with only the output set uses the recorded settings (the VAE too)
    bare = {k: v for k, v in env.items() if k not in ("IMAGENET_INT8_VAE", "IMAGENET_INT8_SOURCE")}
    bare["DAGSTER_HOME"] = str(tmp_path / "out" / "dagster_home")
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "imagenet_int8_assets", "--select", "vae_latents", "--partition", "a"],
        env=bare, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with dg.DagsterInstance.from_config(str(tmp_path / "out" / "dagster_home")) as instance:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("vae_latents"), asset_partitions=["a"]), limit=1
        ).records
    assert records, "vae_latents[a] was not materialized"
    assert records[0].asset_materialization.metadata["vae"].value == "tiny-random"

    other = dict(bare, IMAGENET_INT8_CROP_SIZE="128")
    proc = subprocess.run(
        [str(BIN / "dagster"), "asset", "materialize", "-m", "imagenet_int8_assets", "--select", "preprocessed_crops", "--partition", "a"],
        env=other, cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode != 0
    assert "IMAGENET_INT8_CROP_SIZE: the output holds 256, this launch has 128" in proc.stdout + proc.stderr

    forced = run_cli([imagenet_int8, "build", "--force", "--precision", "bf16"], env, cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-4000:]
    assert json.loads((tmp_path / "out" / "settings.json").read_text())["precision"] == "bf16"
