"""Test support: the one harness for a real `dagster dev` (webserver + daemon) in a subprocess,
driven through GraphQL with the same operations the UI sends.

Every test that needs the servers uses ``running_dagster_dev`` (a context manager): it starts
`dagster dev` on a free port in its own process group, waits until the code location is served,
yields a ``DagsterDev`` (``.graphql``, ``.base``, ``.out``, ``.home``, ``.served``, ``.log_tail()``),
and on the way out stops the whole process group; when the block raised, the tail of the
`dagster dev` log is printed (pytest shows it with the failure)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import tempfile
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from imagenet_int8_assets_tests.support.builds import BIN, REPO
from imagenet_int8_assets_tests.support.local_servers import free_port  # noqa: F401  (the tests' one free_port)

LOCATION = "imagenet_int8_assets"
STARTUP_TIMEOUT_S = 180

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
    isMaterializable
    description
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

# What "Materialize unsynced" offers: every asset (and class partition) that is not FRESH.
STALE_STATUS_QUERY = """
query StaleStatus {
  assetNodes { assetKey { path } isPartitioned isMaterializable staleStatus }
}
"""
PARTITION_STALE_STATUS_QUERY = """
query PartitionStaleStatus($keys: [AssetKeyInput!], $partitions: [String!]!) {
  assetNodes(assetKeys: $keys) { assetKey { path } staleStatusByPartition(partitions: $partitions) }
}
"""


def unsynced(dev: "DagsterDev", partitions: list[str]) -> list[tuple[str, str]]:
    """(asset[partition], status) for everything "Materialize unsynced" would offer: not FRESH."""
    nodes = [n for n in dev.graphql(STALE_STATUS_QUERY)["assetNodes"] if n["isMaterializable"]]
    found = [(n["assetKey"]["path"][0], n["staleStatus"]) for n in nodes if not n["isPartitioned"]]
    keys = [{"path": n["assetKey"]["path"]} for n in nodes if n["isPartitioned"]]
    if keys:
        data = dev.graphql(PARTITION_STALE_STATUS_QUERY, {"keys": keys, "partitions": partitions})
        for node in data["assetNodes"]:
            found += [(f"{node['assetKey']['path'][0]}[{p}]", s) for p, s in zip(partitions, node["staleStatusByPartition"])]
    return [(name, status) for name, status in found if status != "FRESH"]


# ------------------------------------------------------------------------------------------
# helpers


def log_tail_of(path: Path, chars: int = 15000) -> str:
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
        self.served: dict | None = None  # wait_until_served's answer, once served

    def log_tail(self) -> str:
        return log_tail_of(self.log)

    def graphql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(
            f"{self.base}/graphql", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # the server's own words: which field failed, and why
            raise AssertionError(f"GraphQL HTTP {exc.code}: {exc.read().decode(errors='replace')[:4000]}") from None
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


def wait_until_served(dev: DagsterDev) -> dict:
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


def run_failures(dev: DagsterDev, run_ids: list[str]) -> str:
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


def dagster_dev_env(out: Path, home: Path, tmp: Path, **settings: str) -> dict:
    """The environment of `dagster dev`: this test's output, DAGSTER_HOME and temp dir, tiny VAE on CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGENET_INT8_")}
    env.update(
        IMAGENET_INT8_OUTPUT=str(out),
        IMAGENET_INT8_VAE="tiny-random",
        IMAGENET_INT8_DEVICE="cpu",
        IMAGENET_INT8_WORKERS="1",
        IMAGENET_INT8_SENSOR_INTERVAL="5",  # the class_folders sensor registers the classes quickly
        DAGSTER_HOME=str(home),
        TMPDIR=str(tmp),
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    env.update(settings)
    return env


def start_dagster_dev(
    env: dict, log: Path, out: Path, home: Path, command: list[str] | None = None, cwd: Path = REPO,
    port: int | None = None,
) -> DagsterDev:
    """Start `dagster dev` in its own process group (stop it with ``DagsterDev.stop``); prefer
    ``running_dagster_dev``, which also waits for it and always stops it.

    By default `dagster dev -w workspace.yaml -p <free port> -h 127.0.0.1` from the repository; a
    test that runs another command line (the demo's printed one) passes ``command`` and the
    ``port`` that line serves on."""
    port = port or free_port()
    if command is None:
        command = [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"), "-p", str(port), "-h", "127.0.0.1"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return DagsterDev(proc, port, log, out, home)


@contextlib.contextmanager
def running_dagster_dev(
    env: dict, log: Path, out: Path, home: Path, command: list[str] | None = None, cwd: Path = REPO,
    port: int | None = None,
):
    """`dagster dev` started (``start_dagster_dev``'s arguments), served (``dev.served`` holds
    ``wait_until_served``'s answer), yielded, and stopped with its whole process group however the
    block ends; a block that raised gets the log's tail printed."""
    dev = start_dagster_dev(env, log, out, home, command=command, cwd=cwd, port=port)
    try:
        dev.served = wait_until_served(dev)
        yield dev
    except BaseException:
        print(f"--- dagster dev log ({log}) ---\n{dev.log_tail()}")
        raise
    finally:
        dev.stop()


def dev_folders(root: Path) -> tuple[Path, Path, Path]:
    """``root``/out, ``root``/home and ``root``/tmp: a `dagster dev`'s output, DAGSTER_HOME (created
    by ``prepare_dagster_home`` or the test) and temp dir (out and tmp created)."""
    out, home, tmp = root / "out", root / "home", root / "tmp"
    for folder in (out, tmp):
        folder.mkdir(parents=True, exist_ok=True)
    return out, home, tmp


def wait_for_classes(dev: DagsterDev, partitions: list[str], timeout_s: float = 240) -> None:
    """Wait until the class partitions are registered (by the class_folders sensor's scan, or an
    earlier build); a backfill can only target registered partitions."""
    import dagster as dg

    from imagenet_int8_assets.partitions import CLASS_PARTITIONS

    deadline = time.monotonic() + timeout_s
    while True:
        with dg.DagsterInstance.from_config(str(dev.home)) as instance:
            known = set(instance.get_dynamic_partitions(CLASS_PARTITIONS))
        if set(partitions) <= known:
            return
        if dev.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"classes {sorted(set(partitions) - known)} were not registered:\n{dev.log_tail()}")
        time.sleep(2)


def launch_backfill(dev: DagsterDev, partitions: list[str], assets: list[str]) -> str:
    """Launch a backfill of ``assets`` over ``partitions`` as the UI does; returns its id."""
    wait_for_classes(dev, partitions)
    params = {
        "partitionNames": partitions,
        "assetSelection": [{"path": [name]} for name in assets],
        "fromFailure": False,
        "tags": [],
    }
    launched = dev.graphql(LAUNCH_BACKFILL_MUTATION, {"backfillParams": params})["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", f"launch failed: {json.dumps(launched, indent=2)}"
    assert launched["backfillId"]
    return launched["backfillId"]


def wait_for_backfill(dev: DagsterDev, backfill_id: str, started: float, deadline_s: float) -> dict:
    """Poll the backfill until it completes (returns it), fails, or is not done ``deadline_s`` after
    ``started`` (a ``time.monotonic()`` value); failures come with run logs and the dagster dev log."""
    deadline = started + deadline_s
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
            return backfill
        if status in ("FAILED", "FAILING", "CANCELED", "CANCELING", "COMPLETED_FAILED"):
            run_ids = [r["runId"] for r in backfill["runs"] or [] if r["status"] != "SUCCESS"]
            pytest.fail(
                f"backfill ended {status}: {json.dumps(backfill.get('error'), indent=2)}\n"
                f"{run_failures(dev, run_ids)}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        if time.monotonic() > deadline:
            run_ids = [r["runId"] for r in backfill["runs"] or []]
            pytest.fail(
                f"backfill still {status} {deadline_s}s into the test; runs {backfill['runs']}\n"
                f"{run_failures(dev, run_ids)}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        time.sleep(2.0)


# ------------------------------------------------------------------------------------------
# single runs (servers/test_run_retries_by_the_daemon.py): launch one as the UI's "Materialize" button does, find its worker


ASSET_JOBS_QUERY = """
query AssetJobs {
  assetNodes {
    assetKey { path }
    jobNames
    repository { name location { name } }
  }
}
"""

LAUNCH_RUN_MUTATION = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on Error { message }
    ... on PythonError { stack }
  }
}
"""

RUN_EVENTS_QUERY = """
query RunEvents($runId: ID!) {
  logsForRun(runId: $runId) {
    __typename
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepStartEvent { stepKey }
      }
    }
    ... on PythonError { message stack }
  }
}
"""

WORKER_PID = re.compile(r"Started process for run \(pid: (\d+)\)")


def launch_asset_run(dev: DagsterDev, assets: list[str]) -> str:
    """Launch one run materializing the unpartitioned ``assets`` as the UI's Materialize button
    does (``launchPipelineExecution`` on the asset job); returns its run id."""
    nodes = dev.graphql(ASSET_JOBS_QUERY)["assetNodes"]
    node = next(n for n in nodes if n["assetKey"]["path"] == [assets[0]])
    job = next(name for name in node["jobNames"] if name.startswith("__ASSET_JOB"))
    params = {
        "selector": {
            "repositoryLocationName": node["repository"]["location"]["name"],
            "repositoryName": node["repository"]["name"],
            "pipelineName": job,
            "assetSelection": [{"path": [name]} for name in assets],
            "assetCheckSelection": [],
        },
        "mode": "default",
        "runConfigData": {},
        "executionMetadata": {"tags": []},
    }
    launched = dev.graphql(LAUNCH_RUN_MUTATION, {"executionParams": params})["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", f"launch failed: {json.dumps(launched, indent=2)}"
    return launched["run"]["runId"]


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state, past the command name


def is_descendant(pid: int, ancestor: int) -> bool:
    """Whether ``pid`` is ``ancestor`` or one of its descendants (Linux /proc)."""
    seen = set()
    while pid and pid not in seen:
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = parent_pid(pid)
    return False


def wait_for_step_worker(dev: DagsterDev, run_id: str, step_key: str, deadline: float) -> int:
    """The pid of the process running ``run_id`` once it has started ``step_key`` (it reports
    "Started process for run (pid: N)"); checked to belong to this `dagster dev`."""
    pid, started = None, False
    while time.monotonic() < deadline:
        logs = dev.graphql(RUN_EVENTS_QUERY, {"runId": run_id})["logsForRun"]
        assert logs["__typename"] == "EventConnection", logs
        for event in logs["events"]:
            found = WORKER_PID.search(event.get("message") or "")
            if found:
                pid = int(found.group(1))
            if event["__typename"] == "ExecutionStepStartEvent" and event["stepKey"] == step_key:
                started = True
            if event["__typename"] in ("RunSuccessEvent", "RunFailureEvent"):
                pytest.fail(f"run {run_id} ended ({event['__typename']}) before it could be killed:\n{dev.log_tail()}")
        if pid is not None and started:
            assert is_descendant(pid, dev.proc.pid), f"pid {pid} is not a process of this dagster dev"
            return pid
        time.sleep(0.2)
    pytest.fail(f"run {run_id} did not start step {step_key} in time (worker pid {pid}):\n{dev.log_tail()}")


def run_summary(run: dict) -> str:
    tags = {t["key"]: t["value"] for t in run["tags"]}
    selection = sorted(p["path"][0] for p in run["assetSelection"] or [])
    shown = {k: v for k, v in tags.items() if k.startswith("dagster/") and "json" not in k}
    return f"{run['runId'][:8]} {run['status']} {selection} {shown}"


def use_home(monkeypatch: pytest.MonkeyPatch, home: Path, tmp: Path) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))


def runs_matching(dev: DagsterDev, run_filter: dict) -> list[dict]:
    runs = dev.graphql(RUNS_QUERY, {"filter": run_filter})["runsOrError"]
    assert runs["__typename"] == "Runs", runs
    return runs["results"]


def wait_for_run(dev: DagsterDev, run_filter: dict, statuses: set[str], deadline: float, what: str) -> dict:
    """Poll until a run matching ``run_filter`` has one of ``statuses`` (returns it); a run that
    finishes otherwise, or none in time, fails with the runs' logs and the dagster dev log."""
    runs: list[dict] = []
    while time.monotonic() < deadline:
        if dev.proc.poll() is not None:
            pytest.fail(f"dagster dev exited with code {dev.proc.returncode}:\n{dev.log_tail()}")
        runs = runs_matching(dev, run_filter)
        done = [r for r in runs if r["status"] in statuses]
        if done:
            return done[0]
        finished = [r for r in runs if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
        if finished:
            pytest.fail(
                f"{what}: run ended {finished[0]['status']}, expected {sorted(statuses)}\n"
                f"{run_failures(dev, [r['runId'] for r in finished])}\n--- dagster dev log ---\n{dev.log_tail()}"
            )
        time.sleep(1.0)
    pytest.fail(
        f"{what}: no run {json.dumps(run_filter)} reached {sorted(statuses)} in time; runs {runs}\n"
        f"{run_failures(dev, [r['runId'] for r in runs])}\n--- dagster dev log ---\n{dev.log_tail()}"
    )
