"""vae_latents leases one device per run (simulated CPU devices), reports it, its batch size and
TFLOP/s, and fails clearly when every device stays leased."""

import os

import dagster as dg

from imagenet_int8_assets.build.run_events import error_text
from imagenet_int8_assets.core.latents.devices import lease_device
from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import make_image_folder


def _run(tmp_path, **settings_kw):
    source = make_image_folder(tmp_path / "src", {"a": 2}) if not (tmp_path / "src").exists() else tmp_path / "src"
    settings = ImagenetInt8Settings(
        source=str(source), output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1, **settings_kw
    )
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.ephemeral()
    job = defs.resolve_implicit_global_asset_job_def()
    assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
    result = job.execute_in_process(
        instance=instance, partition_key="a", raise_on_error=False,
        asset_selection=[dg.AssetKey("preprocessed_crops"), dg.AssetKey("vae_latents")],
    )
    return settings, instance, result


def test_a_run_takes_a_free_device_and_reports_batch_size_and_tflops(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with lease_device(out, ["cpu:0", "cpu:1"], purpose="another run") as held:  # another run holds cpu:0
        assert held == "cpu:0"
        _, instance, result = _run(tmp_path, devices="cpu:0,cpu:1")
    assert result.success
    meta = instance.get_latest_materialization_event(dg.AssetKey("vae_latents")).asset_materialization.metadata
    assert meta["device_lease"].value == "cpu:1" and meta["device"].value == "cpu"
    choice = meta["batch_size_choice"].value
    assert choice["batch_size"] == 16 and choice["source"] == "cpu"  # auto on the CPU: 16, no probe
    assert meta["encoder_gflops_per_image"].value > 0 and meta["tflops"].value > 0
    # crops kept as hashes (the default) were recomputed by workers while the VAE encoded
    assert meta["crops_streamed"].value is True
    assert {"crop_s", "encode_s", "encoder_waited_s", "producers_waited_s"} <= set(meta["pipeline"].value)


def test_every_device_leased_fails_after_the_wait_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with lease_device(out, ["cpu:0"], purpose="the other build"):
        _, _, result = _run(tmp_path, devices="cpu:0", device_wait=1)
    assert not result.success
    failures = [error_text(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures and f"cpu:0: pid {os.getpid()}" in failures[0], failures  # the holder: this process
    assert "dagster instance concurrency set gpu 1" in failures[0]
