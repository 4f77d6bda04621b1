"""The `dagster dev` line that ``imagenet-int8 demo`` prints works verbatim in a bare, offline shell
(a real webserver + daemon), and a UI backfill of everything rebuilds the demo's dataset byte for
byte with the same (fallback) VAE.

Tiny random VAE on CPU; no network, no mocks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import pytest

from imagenet_int8_assets_tests.support.builds import BIN, cli_env, run_cli
from imagenet_int8_assets_tests.support.dagster_dev import (
    ASSET_NODES_QUERY,
    free_port,
    launch_backfill,
    run_summary,
    running_dagster_dev,
    runs_matching,
    use_home,
    wait_for_backfill,
)

ASSETS = [
    "raw_manifest", "preprocessed_crops", "vae_latents", "quantization_stats", "mds_shards", "mds_dataset",
    "reconstruction_report", "probe_features", "latent_probe",
]
UI_LINE_HEADER = "See the runs and assets in the UI:"


def published_shards(mds: Path) -> dict[str, str]:
    """Every file that mds/index.json publishes (its shards), by path, with its hash."""
    index = json.loads((mds / "index.json").read_text())
    files = {}
    for shard in index["shards"]:
        for part in ("raw_data", "zip_data"):
            info = shard.get(part)
            if info:
                path = mds / info["basename"]
                files[info["basename"]] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


@pytest.mark.timeout(600)
def test_demo_printed_ui_command_works_verbatim_offline_and_its_backfill_uses_the_same_vae(tmp_path: Path, monkeypatch):
    started = time.monotonic()
    vae_id = "some-org/not-a-cached-vae"
    env = cli_env(tmp_path, IMAGENET_INT8_VAE=vae_id, IMAGENET_INT8_DEMO_VAE_FALLBACK="tiny-random")
    demo = run_cli([str(BIN / "imagenet-int8"), "demo"], env, timeout=300)
    assert demo.returncode == 0, f"demo failed ({demo.returncode}):\n{demo.stdout[-5000:]}\n{demo.stderr[-10000:]}"
    print(f"\n[demo] built in {time.monotonic() - started:.1f}s")
    lines = demo.stdout.splitlines()
    assert UI_LINE_HEADER in lines, f"no {UI_LINE_HEADER!r} in the demo's output:\n{demo.stdout}"
    line = lines[lines.index(UI_LINE_HEADER) + 1].strip()
    print(f"[demo] printed: {line}")
    words = shlex.split(line)
    assignments = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert assignments.get("IMAGENET_INT8_VAE_FALLBACK") == "tiny-random", line
    assert assignments.get("IMAGENET_INT8_VAE") == vae_id, line
    assert "WARNING: real VAE weights were not available" in demo.stdout, demo.stdout
    home = Path(assignments["DAGSTER_HOME"])
    out = Path(assignments["IMAGENET_INT8_OUTPUT"])
    mds = out / "mds"

    index_before = (mds / "index.json").read_bytes()
    shards_before = published_shards(mds)
    assert shards_before, "the demo published no shards"

    # A user's bare shell, offline. The line runs verbatim; the port comes from the environment
    # (dagster dev passes no --port, so dagster-webserver reads DAGSTER_WEBSERVER_PORT) so that
    # the test does not depend on port 3000 being free.
    port = free_port()
    tmp = tmp_path / "shell-tmp"
    tmp.mkdir()
    shell_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TMPDIR": str(tmp),
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "DAGSTER_WEBSERVER_PORT": str(port),
    }
    if "OMP_NUM_THREADS" in env:  # the demo's: build.json records the CPU thread count (part of a class version)
        shell_env["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]
    with running_dagster_dev(
        shell_env, tmp_path / "dagster_dev.log", out, home, command=["bash", "-c", line], cwd=tmp_path, port=port
    ) as dev:
        print(f"[demo] the printed line serves on port {port} after {time.monotonic() - started:.1f}s")
        nodes = {n["assetKey"]["path"][0]: n for n in dev.graphql(ASSET_NODES_QUERY)["assetNodes"]}
        classes = nodes["vae_latents"]["partitionKeys"]
        assert classes, "the demo registered no class partitions"

        launched = time.monotonic()
        backfill_id = launch_backfill(dev, classes, ASSETS)
        backfill = wait_for_backfill(dev, backfill_id, started, 540)
        print(f"[demo] backfill {backfill['status']} in {time.monotonic() - launched:.1f}s")
        runs = runs_matching(dev, {"tags": [{"key": "dagster/backfill", "value": backfill_id}]})
        assert runs and all(r["status"] == "SUCCESS" for r in runs), [run_summary(r) for r in runs]

    # ---- the same dataset, the same VAE ------------------------------------------------------
    shards_after = published_shards(mds)
    assert shards_after == shards_before, (
        f"the UI backfill published different shards:\nbefore {shards_before}\nafter  {shards_after}"
    )
    index_after = (mds / "index.json").read_bytes()
    assert index_after == index_before, "mds/index.json changed after the UI backfill"

    use_home(monkeypatch, home, tmp)
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    with DagsterInstance.get() as instance:
        assert Path(instance.root_directory).resolve() == home.resolve()
        for key in classes:
            records = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=AssetKey("vae_latents"), asset_partitions=[key]), limit=1
            ).records
            assert records, f"vae_latents[{key}] has no materialization"
            entry = records[0].event_log_entry
            run = instance.get_run_by_id(entry.run_id)
            assert run.tags.get("dagster/backfill") == backfill_id, (key, run.tags)
            metadata = entry.asset_materialization.metadata
            assert metadata["vae"].value == vae_id, (key, metadata["vae"])
            assert metadata["vae_fallback"].value is True, (key, metadata["vae_fallback"])
    print(f"[demo] whole test {time.monotonic() - started:.1f}s")
