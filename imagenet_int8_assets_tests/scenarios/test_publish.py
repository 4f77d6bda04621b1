"""Publishing to the Hub: the real `imagenet-int8 publish` CLI (and the hub_upload asset) against
a local fake Hub that the real huggingface_hub client talks HTTP to (fake_hub.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from imagenet_int8_assets.core.dataset import mds_index
from imagenet_int8_assets.core.hub.hub_upload import FINAL_FILES
from imagenet_int8_assets_tests.support.builds import BIN, cli_env, make_image_folder, run_cli
from imagenet_int8_assets_tests.scenarios.test_end_to_end import SEED_STYLE_READER

REPO_ID = "me/latents"
PUBLISH = [str(BIN / "imagenet-int8"), "publish", "--repo", REPO_ID]


def _env(tmp_path: Path, hub, **extra) -> dict:
    env = cli_env(tmp_path, IMAGENET_INT8_REPORT_PER_CLASS="1", **extra)
    env.update(hub.env(tmp_path / "hf-home"))
    return env


def _last_upload(tmp_path: Path) -> dict:
    with dg.DagsterInstance.from_config(str(tmp_path / "out" / "dagster_home")) as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("hub_upload"))
    assert event is not None, "hub_upload recorded no materialization"
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def _local_files(tmp_path: Path) -> dict[str, bytes]:
    """What the repository should hold, read from the output (the published index's folders)."""
    out = tmp_path / "out"
    root = out / "mds"
    index = mds_index.read_index(root)
    files = {name: (root / name).read_bytes() for name in ("index.json", "build.json")}
    for folder in {str(Path(s["raw_data"]["basename"]).parent) for s in index["shards"]}:
        for path in (root / folder).iterdir():
            files[f"{folder}/{path.name}"] = path.read_bytes()
    return files


def _committed(hub, repo: str) -> list[dict]:
    return [c for c in hub.stats(repo)["commits"] if not c.get("empty")]


def _samples(root: Path) -> list[tuple[bytes, int, str]]:
    from imagenet_int8_assets.reader import open_dataset

    ds = open_dataset(root)
    return sorted((ds[i]["latent"].tobytes(), ds[i]["label"], ds[i]["label_as_text"]) for i in range(ds.num_samples))


def _seed_reader(remote: Path, local: Path) -> list:
    """Every sample as the published Imagenet.int8 reader snippet sees it (run in a subprocess)."""
    proc = subprocess.run(
        [sys.executable, "-c", SEED_STYLE_READER, str(remote), str(local)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return sorted((r["label"], r["label_as_text"], r["sha1"]) for r in rows)


def _grep_token(tmp_path: Path, token: bytes, *texts: str) -> list[str]:
    hits = [str(p) for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and token in p.read_bytes()]
    return hits + [f"output #{i}" for i, text in enumerate(texts) if token.decode() in text]


@pytest.mark.slow
def test_publish_refusals_then_upload_download_rerun_and_one_changed_class(tmp_path, fake_hub):
    source = make_image_folder(tmp_path / "src", {"a": 3, "b": 3, "c": 2})
    env = _env(tmp_path, fake_hub, IMAGENET_INT8_SOURCE=str(source))
    token = env["HF_TOKEN"].encode()
    outputs = []

    # A blocking reconstruction check that fails stops the upload (no repository is even created):
    # another output whose tiny range clips most latent values.
    clipped = {
        "IMAGENET_INT8_OUTPUT": str(tmp_path / "clipped"), "IMAGENET_INT8_QUANT_RANGE": "0.25",
        "IMAGENET_INT8_REPORT_BLOCKING": "true", "IMAGENET_INT8_REPORT_MAX_CLIP_FRACTION": "0.01",
    }
    blocked = run_cli(PUBLISH + ["--allow-random-weights"], {**env, **clipped}, cwd=tmp_path)
    outputs += [blocked.stdout, blocked.stderr]
    summary = json.loads((tmp_path / "clipped" / "report" / "summary.json").read_text())
    assert summary["clip_fraction"] > 0.01, "the test needs clipped latents to trip the check"
    assert blocked.returncode == 1, blocked.stderr[-3000:]
    assert "reconstruction_quality" in blocked.stderr and "hub_upload" in blocked.stderr, blocked.stderr[-3000:]
    assert not fake_hub.repo_exists(REPO_ID)

    # Random weights are refused unless forced.
    refused = run_cli(PUBLISH, env, cwd=tmp_path)
    outputs += [refused.stdout, refused.stderr]
    assert refused.returncode == 1
    assert "refusing to publish" in refused.stderr and "--allow-random-weights" in refused.stderr, refused.stderr[-3000:]
    assert not fake_hub.repo_exists(REPO_ID)

    first = run_cli(PUBLISH + ["--allow-random-weights"], env, cwd=tmp_path)
    outputs += [first.stdout, first.stderr]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Published:" in first.stdout and REPO_ID in first.stdout
    remote = fake_hub.files(REPO_ID)
    expected = _local_files(tmp_path)
    assert {p: remote[p] for p in expected} == expected  # the index and exactly the shard folders it names
    assert not [p for p in remote if p.startswith("classes/") and p not in expected]
    card = remote["README.md"].decode()
    assert card.startswith("---\n") and "WARNING" in card and REPO_ID in card
    assert {"data/a.parquet", "data/b.parquet", "data/c.parquet", "report/grid.png", "stats/quantization_stats.json"} <= set(remote)
    meta = _last_upload(tmp_path)
    sent = [p for p in remote if p != ".gitattributes"]
    assert meta["files_sent"] == len(sent) and meta["files_skipped"] == 0 and meta["created"] is True
    assert meta["bytes_sent"] == sum(len(remote[p]) for p in sent)
    assert meta["private"] is True and meta["repository"].endswith(f"/datasets/{REPO_ID}")
    assert json.loads(meta["commits"]) if isinstance(meta["commits"], str) else meta["commits"]
    commits = len(_committed(fake_hub, REPO_ID))

    # Read it back from the Hub: a published-style reader and the fast loader see the local dataset.
    from huggingface_hub import snapshot_download

    from imagenet_int8_assets.reader import load_latents

    download = Path(snapshot_download(REPO_ID, repo_type="dataset", local_dir=tmp_path / "download", endpoint=fake_hub.endpoint))
    assert _samples(download) == _samples(tmp_path / "out" / "mds")
    published_style = [_seed_reader(root, tmp_path / f"local-{n}") for n, root in enumerate((download, tmp_path / "out" / "mds"))]
    assert published_style[0] == published_style[1] and len(published_style[0]) == 8
    local = load_latents(tmp_path / "out" / "mds")
    hub = load_latents(REPO_ID)
    assert np.array_equal(hub.codes, local.codes) and np.array_equal(hub.labels, local.labels)
    assert hub.label_texts == local.label_texts

    # The parquet export loads with `datasets` and holds exactly the MDS codes.
    import datasets

    parquet = datasets.load_dataset(
        "parquet", data_files=sorted(str(p) for p in (download / "data").glob("*.parquet")),
        split="train", cache_dir=str(tmp_path / "ds-cache"),
    )
    rows = sorted((bytes(r["vae_output"]), r["label"], r["label_as_text"]) for r in parquet)
    assert rows == sorted((local.codes[i].tobytes(), int(local.labels[i]), local.label_texts[int(local.labels[i])]) for i in range(len(local)))
    assert all(r["image_id"] for r in parquet)

    # Nothing changed: no commit, no file content.
    fake_hub.reset_stats(REPO_ID)
    again = run_cli(PUBLISH + ["--allow-random-weights"], env, cwd=tmp_path)
    outputs += [again.stdout, again.stderr]
    assert again.returncode == 0, again.stderr[-3000:]
    stats = fake_hub.stats(REPO_ID)
    assert stats["commits"] == [] and stats["lfs_bytes"] == 0 and stats["regular_bytes"] == 0
    meta = _last_upload(tmp_path)
    assert meta["files_sent"] == 0 and meta["files_skipped"] == len(sent) and "up to date" in meta["summary"]

    # One class changes: only its files, the index, build.json, the card (and report/stats) go up.
    old_b = [p for p in remote if p.startswith("classes/b/")]
    make_image_folder(source, {"b": 1})  # rewrites b_0000.JPEG with another picture
    fake_hub.reset_stats(REPO_ID)
    changed = run_cli(PUBLISH + ["--allow-random-weights"], env, cwd=tmp_path)
    outputs += [changed.stdout, changed.stderr]
    assert changed.returncode == 0, changed.stderr[-3000:]
    added = {p for c in _committed(fake_hub, REPO_ID) for p in c["added_paths"]}
    deleted = {p for c in _committed(fake_hub, REPO_ID) for p in c["deleted_paths"]}
    assert not [p for p in added if p.startswith(("classes/a/", "classes/c/", "data/a.", "data/c."))], added
    assert {"index.json", "build.json", "data/b.parquet"} <= added
    assert any(p.startswith("classes/b/") for p in added)
    assert deleted == set(old_b)
    assert len(_committed(fake_hub, REPO_ID)) >= 1 and commits >= 1
    assert fake_hub.files(REPO_ID)["index.json"] == (tmp_path / "out" / "mds" / "index.json").read_bytes()

    # The token appears in no file (event log, run logs, output, caches) and no command output.
    assert _grep_token(tmp_path, token, *outputs) == []


@pytest.mark.slow
def test_a_killed_upload_resumes_sending_only_the_rest(tmp_path, fake_hub):
    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2, "c": 2})
    env = _env(tmp_path, fake_hub, IMAGENET_INT8_SOURCE=str(source))
    assert run_cli([str(BIN / "imagenet-int8"), "build"], env, cwd=tmp_path).returncode == 0
    args = PUBLISH + ["--allow-random-weights", "--files-per-commit", "2"]
    # time to kill between an LFS upload and its commit (3 s: the suite runs three tests at once on two cores)
    fake_hub.slow("POST", r"/commit/", 3.0)
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if fake_hub.repo_exists(REPO_ID):
            stats = fake_hub.stats(REPO_ID)
            if len(stats["commits"]) >= 2 and stats["lfs_uploads"] > sum(len(c["lfs_paths"]) for c in stats["commits"]):
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the upload finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    fake_hub.slow("POST", r"/commit/", 0)
    time.sleep(3.5)  # a commit the killed client had already sent is still applied (as on the Hub): let it land
    before = fake_hub.stats(REPO_ID)
    done_before = {p for c in before["commits"] for p in c["added_paths"]}
    assert done_before and not set(FINAL_FILES) & done_before  # killed part-way: the index is not there yet
    # LFS objects the killed client uploaded for a commit it never sent (0 when its commit had gone
    # out; core/hub/test_hub_upload.py covers that case deterministically)
    uploaded_not_committed = before["lfs_uploads"] - sum(len(c["lfs_paths"]) for c in before["commits"])

    fake_hub.reset_stats(REPO_ID)
    rerun = run_cli(args, env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = fake_hub.stats(REPO_ID)
    added = {p for c in after["commits"] for p in c["added_paths"]}
    assert not added & done_before  # what was committed is not sent again
    assert set(FINAL_FILES) <= added
    meta = _last_upload(tmp_path)
    assert meta["files_skipped"] == len(done_before)
    assert meta["files_resumed"] == after["batch_present"] == uploaded_not_committed  # uploaded, not re-sent
    assert after["lfs_uploads"] == meta["files_sent"] - sum(len(c["regular_paths"]) for c in after["commits"])
    remote = fake_hub.files(REPO_ID)
    expected = _local_files(tmp_path)
    assert {p: remote[p] for p in expected} == expected


def test_without_a_repository_hub_upload_is_not_in_the_graph_and_an_empty_one_says_how_to_enable_it(tmp_path):
    """No repository configured: hub_upload is not in the graph, so "Materialize all" builds what there is
    and ends green (an asset recording nothing failed the backfill). A repository emptied for one run
    (the launchpad) is refused with how to enable publishing."""
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", device="cpu")
    keys = build_definitions(settings).resolve_asset_graph().get_all_asset_keys()
    assert dg.AssetKey("hub_upload") not in keys and dg.AssetKey("mds_dataset") in keys

    with_repo = build_definitions(settings.model_copy(update={"hub_repo": "me/data"}))
    instance = dg.DagsterInstance.ephemeral()
    result = with_repo.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("hub_upload")], raise_on_error=False,
        run_config={"resources": {"settings": {"config": {"hub_repo": ""}}}},
    )
    assert not result.success
    assert instance.get_latest_materialization_event(dg.AssetKey("hub_upload")) is None
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message
    assert "no Hub repository configured" in message and "IMAGENET_INT8_HUB_REPO" in message, message
    assert "imagenet-int8 publish" in message, message


@pytest.mark.parametrize("repo", ["no-slash", "a/b/c", "bad name/x"])
def test_publish_refuses_a_bad_repository_id_before_any_work(tmp_path, repo):
    env = cli_env(tmp_path)
    proc = run_cli([str(BIN / "imagenet-int8"), "publish", "--repo", repo], env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "IMAGENET_INT8_HUB_REPO" in proc.stderr and "owner/name" in proc.stderr
    assert not (tmp_path / "out" / "mds").exists()


def _instance_text(tmp_path: Path) -> tuple[str, list[str]]:
    """Every record of the output's Dagster instance as text (runs with their tags and config, every
    event of every run, materialization metadata included), and the messages of those events."""
    from dagster._serdes import serialize_value

    parts, messages = [], []
    with dg.DagsterInstance.from_config(str(tmp_path / "out" / "dagster_home")) as instance:
        for run in instance.get_runs():
            parts.append(serialize_value(run))
            for entry in instance.all_logs(run.run_id):
                parts.append(serialize_value(entry))
                messages.append(entry.message or "")
    return "\n".join(parts), messages


@pytest.mark.slow
def test_credentials_in_hf_endpoint_never_leak_and_a_silent_hub_fails_within_the_timeout(tmp_path, fake_hub):
    """HF_ENDPOINT=http://user:secretpw@host (a Hub behind basic auth): a publish the Hub refuses (HTTP
    500), one whose commit the Hub never answers (it fails within IMAGENET_INT8_HUB_TIMEOUT, saying
    what it was doing) and the re-run that completes show and record the endpoint only redacted:
    "secretpw" is in no event of the instance, no compute log, no file of the output, no command output."""
    source = make_image_folder(tmp_path / "src", {"a": 2, "b": 2})
    fake_hub.basic_auth = ("user", "secretpw")
    shown = fake_hub.endpoint.replace("http://", "http://***@")
    env = _env(tmp_path, fake_hub, IMAGENET_INT8_SOURCE=str(source), IMAGENET_INT8_HUB_TIMEOUT="2")
    env["HF_ENDPOINT"] = fake_hub.endpoint.replace("http://", "http://user:secretpw@")
    args = PUBLISH + ["--allow-random-weights", "--verbose"]
    outputs = []

    fake_hub.fail("POST", r"/preupload/", status=500, times=1)
    refused = run_cli(args, env, cwd=tmp_path)
    outputs += [refused.stdout, refused.stderr]
    assert refused.returncode == 1, refused.stderr[-3000:]
    assert f"the Hub at {shown} answered HTTP 500 while publishing {REPO_ID}" in refused.stderr, refused.stderr[-3000:]

    fake_hub.hang("POST", r"/commit/")  # the Hub goes silent on the commit (the fake holds it up to 600 s)
    started = time.monotonic()
    silent = run_cli(args, env, cwd=tmp_path)
    took = time.monotonic() - started
    outputs += [silent.stdout, silent.stderr]
    assert silent.returncode == 1, silent.stderr[-3000:]
    assert took < 120, took  # the command (its Dagster runs included), not the 600 s the Hub stays silent
    message = next((line.strip() for line in silent.stderr.splitlines() if line.strip().startswith("hub_upload: ")), "")
    expected = f"hub_upload: the Hub at {shown} did not answer for 2 s while committing 1/"
    assert message.startswith(expected), silent.stderr[-3000:]
    assert "re-run `imagenet-int8 publish`" in message and "IMAGENET_INT8_HUB_TIMEOUT" in message, message
    assert not fake_hub.files(REPO_ID).keys() & set(FINAL_FILES)

    fake_hub.release()  # the Hub answers again: the re-run completes
    done = run_cli(args, env, cwd=tmp_path)
    outputs += [done.stdout, done.stderr]
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"Published: {fake_hub.endpoint}/datasets/{REPO_ID}" in done.stdout, done.stdout[-3000:]
    remote = fake_hub.files(REPO_ID)
    expected = _local_files(tmp_path)
    assert {p: remote[p] for p in expected} == expected
    assert _last_upload(tmp_path)["repository"] == f"{fake_hub.endpoint}/datasets/{REPO_ID}"
    assert fake_hub.stats()["basic_auth_requests"] > 0  # the credentials were used, as basic auth

    events, messages = _instance_text(tmp_path)
    assert any(f"files to {shown} {REPO_ID}@main" in m for m in messages)  # the endpoint is shown, redacted
    assert "secretpw" not in events
    home = tmp_path / "out" / "dagster_home"
    compute_logs = [p for p in home.rglob("*") if p.is_file() and p.suffix in (".out", ".err")]
    assert any(shown.encode() in p.read_bytes() for p in compute_logs), compute_logs  # the run's captured output
    assert _grep_token(tmp_path, b"secretpw", *outputs) == []


@pytest.mark.parametrize("value", ["0", "-5", "soon"])
def test_a_hub_timeout_that_is_not_a_positive_number_of_seconds_is_refused(tmp_path, value):
    import re

    from imagenet_int8_assets.resources import ImagenetInt8Settings, SettingsError

    env = {"IMAGENET_INT8_OUTPUT": str(tmp_path / "out"), "IMAGENET_INT8_HUB_TIMEOUT": value}
    with pytest.raises(SettingsError, match=rf"^IMAGENET_INT8_HUB_TIMEOUT='?{re.escape(value)}'?[: ]"):
        ImagenetInt8Settings.from_env(env)
    assert ImagenetInt8Settings.from_env({**env, "IMAGENET_INT8_HUB_TIMEOUT": "30"}).hub_timeout == 30
