"""End to end through the real UI stack: `dagster dev` (webserver + daemon) in a subprocess.

Proves that (1) the webserver serves the whole asset graph with its class partitions and (2) a
backfill of every partition of the whole graph, launched the way the UI launches it (the GraphQL
mutation ``launchPartitionBackfill`` posted to ``/graphql``), is carried out by the daemon and
produces a dataset that StreamingDataset reads.

Runs on the bundled sample (4 classes) with the tiny random VAE on CPU; no network, no mocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from imagenet_int8_assets.instance import prepare_dagster_home

REPO = Path(__file__).resolve().parents[1]
LOCATION = "imagenet_int8_assets"
CLASSES = ["n01440764", "n02102040", "n02979186", "n03000684"]
ASSETS = [
    "raw_manifest", "preprocessed_crops", "vae_latents", "quantization_stats", "mds_shards", "mds_dataset",
    "reconstruction_report", "probe_features", "latent_probe",
]
PARTITIONED = {"preprocessed_crops", "vae_latents", "mds_shards"}
PARTITIONS_PER_RUN = 2
LATENT_BYTES = 4 * 32 * 32

STARTUP_TIMEOUT_S = 180
# The backfill must finish this long after the test starts, leaving the rest of the 600 s
# pytest-timeout for the checks and the teardown (so a slow run fails with diagnostics).
BACKFILL_DEADLINE_S = 480

# ------------------------------------------------------------------------------------------
# GraphQL documents (the same operations the UI sends)

WORKSPACE_QUERY = """
query Workspace {
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { name repositories { name } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

ASSET_NODES_QUERY = """
query AssetNodes {
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionKeys
    repository { name location { name } }
    backfillPolicy { maxPartitionsPerRun }
  }
}
"""

LAUNCH_BACKFILL_MUTATION = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PartitionSetNotFoundError { message }
    ... on PartitionKeysNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message stack }
  }
}
"""

BACKFILL_QUERY = """
query Backfill($backfillId: String!) {
  partitionBackfillOrError(backfillId: $backfillId) {
    __typename
    ... on PartitionBackfill {
      id
      status
      isAssetBackfill
      numPartitions
      error { message stack }
      runs { runId status }
    }
    ... on BackfillNotFoundError { message }
    ... on PythonError { message stack }
  }
}
"""

RUNS_QUERY = """
query BackfillRuns($filter: RunsFilter!) {
  runsOrError(filter: $filter) {
    __typename
    ... on Runs {
      results {
        runId
        status
        startTime
        endTime
        assetSelection { path }
        tags { key value }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

RUN_FAILURES_QUERY = """
query RunLogs($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepFailureEvent { stepKey error { message stack } }
        ... on RunFailureEvent { error { message stack } }
      }
    }
  }
}
"""

ASSET_STATUS_QUERY = """
query AssetStatus {
  assetNodes {
    assetKey { path }
    partitionStats { numMaterialized numPartitions numFailed numMaterializing }
    assetMaterializations(limit: 1) { runId }
  }
}
"""


# ------------------------------------------------------------------------------------------
# helpers


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(path: Path, chars: int = 15000) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "<no dagster dev log>"
    return text[-chars:]


class DagsterDev:
    """A running `dagster dev`, its GraphQL endpoint and its log."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path, out: Path, home: Path):
        self.proc, self.port, self.log, self.out, self.home = proc, port, log, out, home
        self.base = f"http://127.0.0.1:{port}"

    def log_tail(self) -> str:
        return _log_tail(self.log)

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.base}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read())
        assert not payload.get("errors"), f"GraphQL errors: {json.dumps(payload['errors'], indent=2)}"
        return payload["data"]

    def stop(self) -> None:
        """Stop the whole process group (webserver, daemon, code servers, run workers)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        # Children may outlive the leader; anything left in the group is killed.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _wait_until_served(dev: DagsterDev) -> dict:
    """Poll /server_info, then the workspace, until the code location has loaded."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if dev.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with code {dev.proc.returncode}:\n{dev.log_tail()}")
        try:
            with urllib.request.urlopen(f"{dev.base}/server_info", timeout=5) as response:
                info = json.loads(response.read())
            workspace = dev.graphql(WORKSPACE_QUERY, timeout=30)["workspaceOrError"]
            entries = workspace.get("locationEntries") or []
            entry = next((e for e in entries if e["name"] == LOCATION), None)
            if entry is not None and entry["loadStatus"] == "LOADED":
                return {"server_info": info, "workspace": workspace}
            last = json.dumps(workspace)[:2000]
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = repr(exc)
        time.sleep(1.0)
    pytest.fail(
        f"dagster dev did not serve the {LOCATION!r} location within {STARTUP_TIMEOUT_S}s "
        f"(last: {last}):\n{dev.log_tail()}"
    )


def _run_failures(dev: DagsterDev, run_ids: list[str]) -> str:
    lines = []
    for run_id in run_ids:
        try:
            logs = dev.graphql(RUN_FAILURES_QUERY, {"runId": run_id})["logsForRun"]
        except Exception as exc:  # diagnostics only
            lines.append(f"run {run_id}: could not read logs: {exc!r}")
            continue
        for event in logs.get("events", []):
            if event["__typename"] == "ExecutionStepFailureEvent":
                err = event.get("error") or {}
                lines.append(f"run {run_id} step {event['stepKey']}: {err.get('message')}\n{err.get('stack')}")
            elif event["__typename"] == "RunFailureEvent":
                err = event.get("error") or {}
                lines.append(f"run {run_id} failed: {event.get('message')} {err.get('message') or ''}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# fixture


@pytest.fixture
def dagster_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out, home, tmp = tmp_path / "out", tmp_path / "home", tmp_path / "tmp"
    for folder in (out, tmp):
        folder.mkdir()

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGENET_INT8_")}
    env.update(
        IMAGENET_INT8_OUTPUT=str(out),
        IMAGENET_INT8_VAE="tiny-random",
        IMAGENET_INT8_DEVICE="cpu",
        IMAGENET_INT8_WORKERS="1",
        IMAGENET_INT8_MAX_PARTITIONS_PER_RUN=str(PARTITIONS_PER_RUN),
        DAGSTER_HOME=str(home),
        TMPDIR=str(tmp),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.pop("IMAGENET_INT8_SOURCE", None)  # the bundled sample
    # This process reads the same instance and writes streaming's temporary files under tmp too.
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    prepare_dagster_home(home)  # what `imagenet-int8` does: shipped dagster.yaml, gpu pool = 1

    port = _free_port()
    log = tmp_path / "dagster_dev.log"
    dagster = Path(sys.executable).parent / "dagster"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [str(dagster), "dev", "-w", str(REPO / "workspace.yaml"), "-p", str(port), "-h", "127.0.0.1"],
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    dev = DagsterDev(proc, port, log, out, home)
    try:
        yield dev
    finally:
        dev.stop()


# ------------------------------------------------------------------------------------------
# the test


@pytest.mark.timeout(600)
def test_ui_serves_graph_and_backfill_of_all_partitions_builds_dataset(dagster_dev: DagsterDev):
    dev = dagster_dev
    started = time.monotonic()

    # ---- (1) the UI serves the whole graph with its class partitions ---------------------
    served = _wait_until_served(dev)
    entry = next(e for e in served["workspace"]["locationEntries"] if e["name"] == LOCATION)
    location = entry["locationOrLoadError"]
    assert location["__typename"] == "RepositoryLocation", f"location failed to load: {location}"
    assert location["repositories"], "the location has no repository"
    print(f"\n[ui] location loaded after {time.monotonic() - started:.1f}s")

    nodes = {tuple(n["assetKey"]["path"]): n for n in dev.graphql(ASSET_NODES_QUERY)["assetNodes"]}
    assert {k[0] for k in nodes if len(k) == 1} >= set(ASSETS), f"asset nodes served: {sorted(nodes)}"
    for name in ASSETS:
        node = nodes[(name,)]
        assert node["repository"]["location"]["name"] == LOCATION
        if name in PARTITIONED:
            assert node["isPartitioned"], f"{name} should be partitioned"
            assert node["partitionKeys"] == CLASSES, f"{name} partitions: {node['partitionKeys']}"
            assert node["backfillPolicy"]["maxPartitionsPerRun"] == PARTITIONS_PER_RUN, node["backfillPolicy"]
        else:
            assert not node["isPartitioned"], f"{name} should not be partitioned"
            assert node["partitionKeys"] == [], f"{name} partitions: {node['partitionKeys']}"

    # ---- (2) backfill every partition of the whole graph, as the UI does ------------------
    params = {
        "partitionNames": CLASSES,
        "assetSelection": [{"path": [name]} for name in ASSETS],
        "fromFailure": False,
        "tags": [],
    }
    launched = dev.graphql(LAUNCH_BACKFILL_MUTATION, {"backfillParams": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", f"launch failed: {json.dumps(launched, indent=2)}"
    backfill_id = launched["backfillId"]
    assert backfill_id
    print(f"[ui] backfill {backfill_id} launched after {time.monotonic() - started:.1f}s")

    deadline = started + BACKFILL_DEADLINE_S
    status, backfill, seen = None, None, None
    while True:
        if dev.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with code {dev.proc.returncode} mid-backfill:\n{dev.log_tail()}")
        backfill = dev.graphql(BACKFILL_QUERY, {"backfillId": backfill_id})["partitionBackfillOrError"]
        assert backfill["__typename"] == "PartitionBackfill", f"backfill lookup failed: {backfill}"
        status = backfill["status"]
        progress = (status, tuple(sorted((r["runId"][:8], r["status"]) for r in backfill["runs"] or [])))
        if progress != seen:
            print(f"[ui] {time.monotonic() - started:6.1f}s backfill {status}, runs: {list(progress[1])}")
            seen = progress
        if status in ("COMPLETED", "COMPLETED_SUCCESS"):
            break
        if status in ("FAILED", "FAILING", "CANCELED", "CANCELING", "COMPLETED_FAILED"):
            run_ids = [r["runId"] for r in backfill["runs"] or [] if r["status"] != "SUCCESS"]
            pytest.fail(
                f"backfill ended {status}: {json.dumps(backfill.get('error'), indent=2)}\n"
                f"{_run_failures(dev, run_ids)}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        if time.monotonic() > deadline:
            run_ids = [r["runId"] for r in backfill["runs"] or []]
            pytest.fail(
                f"backfill still {status} {BACKFILL_DEADLINE_S}s into the test; runs {backfill['runs']}\n"
                f"{_run_failures(dev, run_ids)}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        time.sleep(2.0)
    elapsed = time.monotonic() - started
    print(f"[ui] backfill {status} after {elapsed:.1f}s")
    assert backfill["isAssetBackfill"], backfill

    # The runs the daemon launched for it: all succeeded, and batching kicked in.
    runs = dev.graphql(RUNS_QUERY, {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}})
    runs = runs["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    results = runs["results"]
    assert results, "the backfill launched no runs"
    assert all(r["status"] == "SUCCESS" for r in results), [(r["runId"], r["status"]) for r in results]
    ranges = []
    for run in results:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        selection = sorted(p["path"][0] for p in run["assetSelection"] or [])
        ranges.append((tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")))
        print(f"[ui] run {run['runId'][:8]} {run['status']} {selection} partition={tags.get('dagster/partition')} range={ranges[-1]}")
    batched = [r for r in ranges if r[0] and r[1] and r[0] != r[1]]
    assert batched, f"no run covered several partitions (policy: {PARTITIONS_PER_RUN} per run): {ranges}"
    # Runs holding the `gpu` pool (they include vae_latents) never overlap.
    gpu_runs = sorted(
        (r["startTime"], r["endTime"], r["runId"][:8])
        for r in results
        if any(p["path"] == ["vae_latents"] for p in r["assetSelection"] or [])
    )
    overlaps = [
        (a[2], b[2]) for a, b in zip(gpu_runs, gpu_runs[1:]) if a[1] is not None and b[0] is not None and b[0] < a[1]
    ]
    print(f"[ui] runs holding the gpu pool: {len(gpu_runs)}, overlapping pairs: {overlaps or 'none'}")
    assert len(gpu_runs) >= 2 and not overlaps, f"gpu-pool runs overlapped: {overlaps}"

    # What the UI shows for each asset afterwards.
    status_nodes = {tuple(n["assetKey"]["path"]): n for n in dev.graphql(ASSET_STATUS_QUERY)["assetNodes"]}
    for name in ASSETS:
        node = status_nodes[(name,)]
        if name in PARTITIONED:
            stats = node["partitionStats"]
            assert stats["numPartitions"] == len(CLASSES), (name, stats)
            assert stats["numMaterialized"] == len(CLASSES), (name, stats)
            assert stats["numFailed"] == 0, (name, stats)
        else:
            assert node["assetMaterializations"], f"{name} has no materialization"

    # ---- stop dagster dev, then check the instance and the dataset on disk ------------------
    dev.stop()
    assert dev.proc.poll() is not None, "dagster dev is still running"

    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.get() as instance:
        assert Path(instance.root_directory).resolve() == dev.home.resolve()
        materialized = instance.get_materialized_partitions(AssetKey("mds_shards"))
        assert materialized == set(CLASSES), f"mds_shards partitions materialized: {sorted(materialized)}"
        for name in ("raw_manifest", "quantization_stats", "mds_dataset", "reconstruction_report", "latent_probe"):
            assert instance.get_latest_materialization_event(AssetKey(name)) is not None, name

    import pandas as pd
    from streaming import StreamingDataset

    import imagenet_int8_assets.reader  # noqa: F401  (registers the 'uint8' latent encoding)

    index = dev.out / "mds" / "index.json"
    assert index.is_file(), f"no {index}"
    manifest = pd.read_parquet(dev.out / "manifest" / "manifest.parquet")
    ok = int((manifest["status"] == "ok").sum())
    assert ok > 0, manifest["status"].value_counts()
    assert set(manifest.loc[manifest["status"] == "ok", "class_folder"]) == set(CLASSES)

    dataset = StreamingDataset(local=str(dev.out / "mds"), batch_size=1, shuffle=False)
    try:
        assert dataset.num_samples == ok, f"{dataset.num_samples} samples in the dataset, {ok} ok rows in the manifest"
        labels = set()
        for i in range(dataset.num_samples):
            sample = dataset[i]
            values = len(sample["vae_output"])
            assert values == LATENT_BYTES, f"sample {i}: vae_output has {values} values"
            labels.add(sample["label_as_text"])
        assert len(labels) == len(CLASSES), labels
    finally:
        del dataset
    print(f"[ui] {ok} samples verified; whole test {time.monotonic() - started:.1f}s")
