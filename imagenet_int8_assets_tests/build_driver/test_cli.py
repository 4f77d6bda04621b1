"""`imagenet-int8` and `dagster asset materialize`, run as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import pandas as pd
import pytest

from imagenet_int8_assets.core.dataset.mds_index import class_home, index_sample_count, read_class_index
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, run_cli







@pytest.mark.slow
def test_build_materializes_everything_through_a_persistent_instance(tmp_path):
    source = make_image_folder(tmp_path / "src", {"n01440764": 3, "n02676566": 2, "n09999999x": 0})
    (source / "n02676566" / "broken.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    env = cli_env(tmp_path)
    proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "2"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Dataset: {tmp_path / 'out' / 'mds'}" in proc.stdout
    assert "5 samples in 3 classes" in proc.stdout and "1 bad" in proc.stdout
    assert "15/15" in proc.stderr  # the progress bar reached its end: 1 + 3 classes * 3 + 5 steps
    ui_line = proc.stdout.splitlines()[proc.stdout.splitlines().index("See the runs and assets in the UI:") + 1]
    assert "IMAGENET_INT8_MAX_PARTITIONS_PER_RUN=2 " in ui_line  # the UI's backfills batch as this build did
    home = tmp_path / "out" / "dagster_home"
    assert (home / "dagster.yaml").is_file()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        runs = instance.get_runs()
        assert len(runs) == 4  # manifest, 2 batches of up to 2 classes, final
        assert instance.get_materialized_partitions(dg.AssetKey("mds_shards")) == {"n01440764", "n02676566", "n09999999x"}
        assert instance.get_latest_materialization_event(dg.AssetKey("mds_dataset")) is not None
    info = json.loads((tmp_path / "out" / "mds" / "build.json").read_text())
    assert info["samples"] == 5 and info["vae"]["requested"] == "tiny-random"


@pytest.mark.slow
def test_build_errors_are_clear_and_nonzero(tmp_path):
    env = cli_env(tmp_path)
    proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(tmp_path / "nowhere")], env)
    assert proc.returncode == 2 and "IMAGENET_INT8_SOURCE" in proc.stderr
    source = make_image_folder(tmp_path / "src", {"a": 1})
    proc = run_cli([str(BIN / "imagenet-int8"), "build", "--source", str(source), "--vae", "stabilityai/sdxl-vae"], env)
    assert proc.returncode == 2  # the VAE is checked before any work starts (no manifest, no crops)
    assert "IMAGENET_INT8_VAE='stabilityai/sdxl-vae'" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "out" / "manifest").exists()
    assert "RANDOM" not in proc.stdout + proc.stderr  # only the demo may fall back


@pytest.mark.slow
def test_demo_falls_back_loudly_and_says_how_to_read(tmp_path):
    env = cli_env(tmp_path)
    del env["IMAGENET_INT8_VAE"]  # the real default, unavailable offline: the demo's fallback
    env["IMAGENET_INT8_DEMO_VAE_FALLBACK"] = "tiny-random"  # keep the test fast on CPU
    proc = run_cli([str(BIN / "imagenet-int8"), "demo"], env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "VAE FALLBACK" in proc.stderr and "RANDOM weights" in proc.stdout
    assert "21 samples in 4 classes" in proc.stdout and "open_dataset" in proc.stdout
    read = proc.stdout.split("Read it:\n")[1].splitlines()[0].strip()
    check = subprocess.run(read, shell=True, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.split()[:4] == ["21", "(4,", "32,", "32)"]


@pytest.mark.slow
def test_dagster_asset_materialize_one_partition(tmp_path):
    source = make_image_folder(tmp_path / "src", {"n01440764": 2, "n01443537": 3})
    env = cli_env(tmp_path, IMAGENET_INT8_SOURCE=str(source), DAGSTER_HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    dagster = str(BIN / "dagster")
    proc = run_cli([dagster, "asset", "materialize", "-m", "imagenet_int8_assets", "--select", "raw_manifest"], env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = run_cli(
        [dagster, "asset", "materialize", "-m", "imagenet_int8_assets",
         "--select", "preprocessed_crops,vae_latents,mds_shards", "--partition", "n01443537"],
        env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    manifest = pd.read_parquet(out / "manifest" / "manifest.parquet")
    assert index_sample_count(read_class_index(out / "mds", "n01443537")) == 3 == (manifest["class_folder"] == "n01443537").sum()
    assert not class_home(out / "mds", "n01440764").exists()  # only the selected partition ran
    with dg.DagsterInstance.from_config(str(tmp_path / "home")) as instance:
        assert instance.get_materialized_partitions(dg.AssetKey("vae_latents")) == {"n01443537"}


@pytest.mark.slow
def test_a_build_killed_mid_write_then_rerun_leaves_a_complete_dataset(tmp_path):
    import signal
    import time

    source = make_image_folder(tmp_path / "src", {f"class{i}": 6 for i in range(4)})
    env = cli_env(tmp_path)
    args = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--max-partitions-per-run", "1"]
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latents = tmp_path / "out" / "latents"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (latents.is_dir() and any(latents.iterdir())):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # somewhere in the middle of the per-class runs
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "out" / "mds" / "index.json").exists()

    rerun = run_cli(args, env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    out = tmp_path / "out"
    hidden = [p for p in out.rglob(".*") if p.name.startswith((".tmp-", ".trash-"))]
    assert hidden == []
    index = json.loads((out / "mds" / "index.json").read_text())
    names = [s["raw_data"]["basename"] for s in index["shards"]]
    assert len(names) == len(set(names)) == 4
    assert sum(s["samples"] for s in index["shards"]) == 24
    assert sorted(p.name for p in (out / "mds").iterdir()) == ["build.json", "classes", "index.json"]
    versions = sorted(p.relative_to(out / "mds").as_posix() for p in (out / "mds" / "classes").glob("*/v-*"))
    assert [v.split("/")[1] for v in versions] == [f"class{i}" for i in range(4)]  # one version each: no orphans
    assert {n.rsplit("/", 1)[0] for n in names} == set(versions)


def test_presets_command_lists_every_preset_with_its_properties(tmp_path):
    from imagenet_int8_assets.core.latents.vae import PRESETS

    proc = run_cli([str(BIN / "imagenet-int8"), "presets"], cli_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line and not line.startswith(" ")}
    for name, preset in PRESETS.items():
        assert name in lines and lines[name][1] == str(preset.latent_channels)
    assert lines["fal/AuraEquiVAE"][3] == "none" and lines["stabilityai/sdxl-vae"][6] == "12.0"


def test_the_command_runs_exit_handlers_flushes_and_exits_with_mains_code(tmp_path):
    """`imagenet-int8` ends with os._exit (pyarrow can abort in C++ static destructors,
    apache/arrow#34314): Python's exit handlers still run, piped output is complete, the code is main's."""
    script = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('exit handler ran', flush=True))\n"
        "from imagenet_int8_assets.cli import run\n"
        "sys.argv = ['imagenet-int8', *sys.argv[1:]]\n"
        "run()\n"
        "print('never reached')\n"
    )
    env = cli_env(tmp_path)
    ok = run_cli([sys.executable, "-c", script, "presets"], env)
    assert ok.returncode == 0, ok.stderr
    assert "stabilityai/sdxl-vae" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    assert "never reached" not in ok.stdout
    refused = run_cli([sys.executable, "-c", script, "build", "--source", str(tmp_path / "missing")], env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith("imagenet-int8: ") and "exit handler ran" in refused.stdout
