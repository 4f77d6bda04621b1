"""A run whose process is killed is failed and re-executed by the shipped instance settings (run
monitoring + run retries in dagster.yaml), through a real `dagster dev` (webserver + daemon)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagenet_int8_assets.build.instance import SHIPPED_DAGSTER_YAML
from imagenet_int8_assets_tests.support.builds import make_image_folder
from imagenet_int8_assets_tests.support.dagster_dev import (
    dagster_dev_env,
    launch_asset_run,
    running_dagster_dev,
    wait_for_run,
    wait_for_step_worker,
)

PNG_SIDE = 8000  # a one-colour 8000x8000 PNG: 0.2 MB on disk, about 0.4 s to decode fully
PNG_COPIES = 48  # so the manifest step takes about 20 s: long enough to be killed mid-step
RUN_DEADLINE_S = 480  # from the start of the test; the rest of the 600 s is for teardown


@pytest.mark.timeout(600)
def test_a_killed_run_is_failed_and_retried_by_the_daemon(tmp_path: Path, own_tmpdir: Path):
    """A real `dagster dev` with the shipped dagster.yaml runs raw_manifest, launched as the UI's
    Materialize button does; its run worker is killed with SIGKILL mid-step. The run must end
    FAILURE and the daemon must re-execute it (dagster/parent_run_id, retry number 1) to SUCCESS."""
    from PIL import Image

    from imagenet_int8_assets.core.common.layout import manifest_path

    started = time.monotonic()
    source = make_image_folder(tmp_path / "src", {"c0": 2, "c1": 2})
    big = tmp_path / "big.png"
    Image.new("RGB", (PNG_SIDE, PNG_SIDE), (120, 80, 40)).save(big, compress_level=9)
    for i in range(PNG_COPIES):  # copies, not links: links to one file are read once
        shutil.copyfile(big, source / f"c{i % 2}" / f"big_{i:03d}.png")
    out, home = tmp_path / "out", tmp_path / "home"
    home.mkdir()
    shutil.copyfile(SHIPPED_DAGSTER_YAML, home / "dagster.yaml")  # the shipped settings, as they are
    env = dagster_dev_env(out, home, own_tmpdir, IMAGENET_INT8_SOURCE=str(source))
    deadline = started + RUN_DEADLINE_S

    with running_dagster_dev(env, tmp_path / "dagster_dev.log", out, home) as dev:
        run_id = launch_asset_run(dev, ["raw_manifest"])
        pid = wait_for_step_worker(dev, run_id, "raw_manifest", deadline)
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"\n[retry] run {run_id[:8]}: worker pid {pid} killed {killed_at - started:.1f}s into the test")

        failed = wait_for_run(dev, {"runIds": [run_id]}, {"FAILURE"}, deadline, "the killed run")
        tags = {t["key"]: t["value"] for t in failed["tags"]}
        print(f"[retry] killed run FAILURE {time.monotonic() - killed_at:.1f}s after the kill")
        retry = wait_for_run(
            dev, {"tags": [{"key": "dagster/parent_run_id", "value": run_id}]}, {"SUCCESS"}, deadline, "the retry"
        )
        print(f"[retry] retry {retry['runId'][:8]} SUCCESS {time.monotonic() - killed_at:.1f}s after the kill")
        # the retry daemon tags the failed run when it launches the retry, which can come after the
        # FAILURE status was first seen: read the tags again now
        failed = wait_for_run(dev, {"runIds": [run_id]}, {"FAILURE"}, deadline, "the killed run")
        tags = {t["key"]: t["value"] for t in failed["tags"]}

    assert tags.get("dagster/will_retry") == "true", tags
    retry_tags = {t["key"]: t["value"] for t in retry["tags"]}
    assert retry_tags["dagster/retry_number"] == "1" and retry_tags["dagster/root_run_id"] == run_id, retry_tags
    assert [p["path"] for p in retry["assetSelection"]] == [["raw_manifest"]]
    with dg_instance(home) as instance:
        crash = [e.message for e in instance.all_logs(run_id) if "terminated by signal 9" in (e.message or "")]
        assert crash, "the killed run's log does not say its process was killed"
        # the run and its one retry (the class_folders sensor may add a raw_manifest run of its own)
        _, group = instance.get_run_group(run_id)
        assert sorted((r.run_id, r.status.value) for r in group) == sorted(
            [(run_id, "FAILURE"), (retry["runId"], "SUCCESS")]
        ), [(r.run_id, r.status) for r in group]
    import pandas as pd

    manifest = pd.read_parquet(manifest_path(out))
    assert len(manifest) == 4 + PNG_COPIES and (manifest["status"] == "ok").all()
    print(f"[retry] whole test {time.monotonic() - started:.1f}s")


@contextmanager
def dg_instance(home: Path):
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance
