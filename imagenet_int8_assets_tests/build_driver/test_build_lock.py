"""One build per output, and killed builds never block anyone.

Real processes throughout: lock holders are separate Python processes killed with SIGKILL, the
builds are real `imagenet-int8` subprocesses, the runs live in a real SQLite Dagster instance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from imagenet_int8_assets.core.common.build_lock import (
    BuildLockBusy,
    build_lock_path,
    current_host,
    hold_build_lock,
    process_identity,
    process_is_alive,
    process_start_token,
)
from imagenet_int8_assets.build.dead_runs import (
    HOST_TAG,
    PID_TAG,
    START_TAG,
    dead_build_runs_sensor,
    fail_dead_build_runs,
    process_run_tags,
)
from imagenet_int8_assets.build.instance import GPU_POOL, prepare_dagster_home
from imagenet_int8_assets_tests.support.builds import BIN, REPO, cli_env, make_image_folder
from imagenet_int8_assets_tests.support.killed_build import kill_build_during_gpu_run

HOLDER = """
import sys, time
from imagenet_int8_assets.core.common.build_lock import hold_build_lock
with hold_build_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _start_holder(output: Path, shared: bool = False) -> subprocess.Popen:
    """A separate process that holds the build lock of ``output`` until it is killed: as a build
    does, or (``shared``) as a Dagster run that writes to the output does."""
    code = HOLDER.replace("hold_build_lock", "share_build_lock") if shared else HOLDER
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(output), "--pretend-flag"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _cli_env(tmp_path: Path, **extra) -> dict:
    return cli_env(
        tmp_path,
        IMAGENET_INT8_DEMO_VAE_FALLBACK="tiny-random",
        IMAGENET_INT8_REPORT_PER_CLASS="1",
        IMAGENET_INT8_PROBE_PER_CLASS="2",
        **extra,
    )


# ------------------------------------------------------------------------------------------
# the lock itself


def test_a_held_lock_refuses_at_once_naming_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        started = time.monotonic()
        with pytest.raises(BuildLockBusy) as refused:
            with hold_build_lock(out):
                pytest.fail("a second holder got the lock")
        assert time.monotonic() - started < 5, "the refusal waited"
        message = str(refused.value)
        assert f"pid {holder.pid} on {current_host()}" in message, message
        assert "started 20" in message and " UTC" in message, message
        assert "--pretend-flag" in message, message  # the holder's command line
        assert str(build_lock_path(out)) in message, message
        assert "\n" not in message
    finally:
        _kill(holder)  # kill -9: no cleanup code runs in the holder
    assert build_lock_path(out).is_file(), "the stale lock file should still be there"
    with hold_build_lock(out) as path:  # ... and does not block
        assert path == build_lock_path(out)
        assert f'"pid": {os.getpid()}' in path.read_text()


def test_process_identity_is_pid_reuse_safe():
    me = process_identity()
    assert me["pid"] == os.getpid() and me["host"] == current_host()
    assert process_is_alive(os.getpid(), str(me["start_token"]))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    token = process_start_token(proc.pid)
    assert process_is_alive(proc.pid, token)
    _kill(proc)
    assert not process_is_alive(proc.pid, token)
    if not me["start_token"]:
        print("no /proc on this platform: a pid that exists counts as alive; the reuse check is skipped")
        return
    # the same pid with another start token is a different (later) process: the recorded one is dead
    assert not process_is_alive(os.getpid(), str(me["start_token"]) + "0")


# ------------------------------------------------------------------------------------------
# dead runs in a real instance


@dg.op(pool=GPU_POOL)
def _gpu_step():
    return 1


@dg.job
def _gpu_job():
    _gpu_step()


def test_runs_of_dead_builds_are_failed_and_free_their_slots(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    prepare_dagster_home(tmp_path / "home")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone_token = process_start_token(gone.pid)
    gone.wait(timeout=30)
    dead_tags = {HOST_TAG: current_host(), PID_TAG: str(gone.pid), START_TAG: gone_token}
    with dg.DagsterInstance.get() as instance:

        def started_run(tags):
            return instance.create_run_for_job(_gpu_job, tags=tags, status=dg.DagsterRunStatus.STARTED)

        dead = started_run(dead_tags)
        alive = started_run(process_run_tags())
        elsewhere = started_run({**dead_tags, HOST_TAG: "another-host.example"})
        foreign = started_run({})  # launched by Dagster itself, not by imagenet-int8
        finished = instance.create_run_for_job(_gpu_job, tags=dead_tags, status=dg.DagsterRunStatus.SUCCESS)
        assert dead.run_op_concurrency and GPU_POOL in dead.run_op_concurrency.all_pools
        # a slot held the way op-granularity pools hold them
        claim = instance.event_log_storage.claim_concurrency_slot(GPU_POOL, dead.run_id, "_gpu_step")
        assert claim.is_claimed
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 1

        assert fail_dead_build_runs(instance) == [dead.run_id]

        runs = (dead, alive, elsewhere, foreign, finished)
        status = {run.run_id: instance.get_run_by_id(run.run_id).status for run in runs}
        assert status == {
            dead.run_id: dg.DagsterRunStatus.FAILURE,
            alive.run_id: dg.DagsterRunStatus.STARTED,
            elsewhere.run_id: dg.DagsterRunStatus.STARTED,
            foreign.run_id: dg.DagsterRunStatus.STARTED,
            finished.run_id: dg.DagsterRunStatus.SUCCESS,
        }
        failure = instance.all_logs(dead.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert len(failure) == 1
        assert f"pid {gone.pid} on {current_host()}" in failure[0].message
        assert "died without finishing it" in failure[0].message
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).active_slot_count == 0
        assert fail_dead_build_runs(instance) == []  # nothing twice

        # the sensor of our definitions does the same, from the daemon of `dagster dev`
        another = started_run(dead_tags)
        tick = dead_build_runs_sensor(dg.build_sensor_context(instance=instance))
        assert isinstance(tick, dg.SkipReason) and another.run_id in tick.skip_message, tick
        assert instance.get_run_by_id(another.run_id).status == dg.DagsterRunStatus.FAILURE


def test_the_dead_run_sensor_is_registered_and_runs_by_default(tmp_path):
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    source = make_image_folder(tmp_path / "src", {"n01440764": 1})
    settings = ImagenetInt8Settings(source=str(source), output=str(tmp_path / "out"), vae="tiny-random", device="cpu")
    sensor_def = build_definitions(settings).resolve_sensor_def("fail_dead_build_runs")
    assert sensor_def.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor_def.minimum_interval_seconds <= 30


# ------------------------------------------------------------------------------------------
# the real command


def test_demo_on_an_output_being_built_is_refused_before_touching_anything(tmp_path):
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        proc = subprocess.run(
            [str(BIN / "imagenet-int8"), "demo", "--output", str(out)],
            env=_cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
    finally:
        _kill(holder)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("imagenet-int8: another build is already running on the output"), lines[0]
    assert f"pid {holder.pid}" in lines[0] and str(build_lock_path(out)) in lines[0]
    assert sorted(p.name for p in out.iterdir()) == [build_lock_path(out).name], "the refused demo wrote something"


def _alembic_heads(home: Path) -> dict[str, int]:
    """Rows of ``alembic_version`` in every SQLite database of a DAGSTER_HOME (1 each when healthy)."""
    import sqlite3

    heads = {}
    for db in sorted(home.rglob("*.db")):
        with sqlite3.connect(db) as conn:
            if conn.execute("SELECT name FROM sqlite_master WHERE name = 'alembic_version'").fetchone():
                heads[str(db.relative_to(home))] = conn.execute("SELECT count(*) FROM alembic_version").fetchone()[0]
    return heads


PREPARE = """
import sys
from imagenet_int8_assets.build.instance import prepare_dagster_home
prepare_dagster_home(sys.argv[1])
"""


@pytest.mark.slow
def test_processes_sharing_a_new_dagster_home_initialize_it_one_at_a_time(tmp_path):
    # Builds of different outputs may share a DAGSTER_HOME set by the user. Without the init lock,
    # three processes creating one new SQLite instance together left two alembic heads in
    # schedules.db in two trials out of three.
    home = tmp_path / "shared_home"
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREPARE, str(home)], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    errors = [proc.communicate(timeout=300)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], "\n-----\n".join(e[-3000:] for e in errors)
    heads = _alembic_heads(home)
    assert len(heads) >= 3 and set(heads.values()) == {1}, heads
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_runs() == []
        assert instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_builds_at_once_then_a_killed_build_that_blocks_nothing(tmp_path):
    source = make_image_folder(tmp_path / "src", {"n01440764": 3, "n02102040": 2})
    out, home = tmp_path / "out", tmp_path / "out" / "dagster_home"
    env = _cli_env(tmp_path)
    command = [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--output", str(out)]

    # ---- two builds started together on a new output: one builds, the other is refused at once
    logs = [tmp_path / f"build-{i}.log" for i in range(2)]
    procs = []
    for log in logs:
        with open(log, "wb") as fh:
            procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT))
    ended: dict[int, float] = {}
    while len(ended) < 2:
        for i, proc in enumerate(procs):
            if i not in ended and proc.poll() is not None:
                ended[i] = time.monotonic()
        time.sleep(0.1)
    codes = [proc.returncode for proc in procs]
    texts = [log.read_text(errors="replace") for log in logs]
    assert sorted(codes) == [0, 2], f"exit codes {codes}:\n" + "\n-----\n".join(t[-3000:] for t in texts)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    assert ended[loser] < ended[winner], "the refused build was not refused before the other one finished"
    refusal = texts[loser].strip().splitlines()
    assert len(refusal) == 1, texts[loser]
    assert f"pid {procs[winner].pid} on {current_host()}, started 20" in refusal[0], refusal[0]
    assert f"command: imagenet-int8 build --source {source} --output {out}" in refusal[0], refusal[0]
    assert f"(lock file {build_lock_path(out)})" in refusal[0], refusal[0]
    assert "Dataset:" in texts[winner]
    assert _alembic_heads(home) and set(_alembic_heads(home).values()) == {1}, _alembic_heads(home)

    # ---- a build killed with SIGKILL mid-run leaves a stale lock file and a STARTED run holding the gpu pool
    # (--force: the output is complete, so an incremental build would start no GPU run to kill)
    killed = kill_build_during_gpu_run([*command, "--force"], env, tmp_path, home, tmp_path / "killed.log")
    assert build_lock_path(out).is_file()

    # ---- the next build is not blocked, fails the dead run, and leaves a healthy instance
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    marked = f"Marked 1 run(s) left unfinished by imagenet-int8 builds whose process died as failed: {killed.run_id}"
    assert marked in proc.stdout, proc.stdout[-2000:]
    assert _alembic_heads(home) and set(_alembic_heads(home).values()) == {1}, _alembic_heads(home)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        failure = instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "died without finishing it" in failure[0].message, failure[0].message
        runs = instance.get_runs()
        done = (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
        unfinished = [r.run_id for r in runs if r.status not in done]
        assert not unfinished, f"runs left unfinished: {unfinished}"
        # every run but the killed one succeeded: the first build's, the killed build's manifest and
        # the last build's (which redoes only what the kill left missing or stale)
        assert [r.run_id for r in runs if r.status != dg.DagsterRunStatus.SUCCESS] == [killed.run_id]
        assert sum(r.status == dg.DagsterRunStatus.SUCCESS for r in runs) >= 3 + 1 + 1


def test_dagster_runs_and_builds_of_one_output_exclude_each_other(tmp_path):
    """A run launched from the UI or `dagster asset materialize` while `imagenet-int8 build` builds the
    same output is refused before it writes anything, naming the build; a build is refused while such
    runs write; such runs go on side by side with one another."""
    from imagenet_int8_assets.definitions import build_definitions
    from imagenet_int8_assets.resources import ImagenetInt8Settings

    source = make_image_folder(tmp_path / "src", {"a": 1})
    out = tmp_path / "out"
    settings = ImagenetInt8Settings(source=str(source), output=str(out), vae="tiny-random", device="cpu", workers=1)
    job = build_definitions(settings).resolve_implicit_global_asset_job_def()
    instance = dg.DagsterInstance.ephemeral()

    build = _start_holder(out)  # what `imagenet-int8 build` holds
    try:
        refused = job.execute_in_process(
            instance=instance, asset_selection=[dg.AssetKey("raw_manifest")], raise_on_error=False
        )
    finally:
        _kill(build)
    assert not refused.success
    text = " ".join(str(e.event_specific_data) for e in refused.all_events if e.is_failure)
    assert "`imagenet-int8 build` is building the output" in text and f"pid {build.pid}" in text, text
    assert not (out / "manifest").exists(), "the refused run wrote to the output"

    run = _start_holder(out, shared=True)  # what a Dagster run that writes to the output holds
    try:
        # another run goes on beside it ...
        assert job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")]).success
        # ... a build does not
        proc = subprocess.run(
            [str(BIN / "imagenet-int8"), "build", "--source", str(source), "--output", str(out)],
            env=_cli_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
        )
    finally:
        _kill(run)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Dagster runs (launched from the UI, `dagster asset materialize` or automation) are writing" in proc.stderr
    assert "Building from" not in proc.stdout
