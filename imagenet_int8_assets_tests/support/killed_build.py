"""Test support: a real `imagenet-int8 build` killed with SIGKILL while a run holds the gpu pool, and
the run processes of a build."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg

from imagenet_int8_assets.build.dead_runs import PID_TAG
from imagenet_int8_assets.build.instance import GPU_POOL

# Printed by the CLI once its DAGSTER_HOME is initialized (under the CLI's own locks).
INSTANCE_READY_LINE = "Dagster instance: DAGSTER_HOME="


def run_processes(pid: int) -> list[int]:
    """The run processes of the `imagenet-int8 build` ``pid``: its children running multiprocessing's
    ``spawn_main`` (Linux /proc)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:
            continue
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _output(log: Path) -> str:
    try:
        return log.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def kill_build_during_gpu_run(
    command: list[str], env: dict, cwd: Path, home: Path, log: Path, timeout_s: float = 300
) -> dg.DagsterRun:
    """Start ``command`` (an `imagenet-int8 build`), kill -9 it while one of its runs that holds the
    ``gpu`` pool is STARTED, and return that run as it was (STARTED) just before the kill."""
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while INSTANCE_READY_LINE not in _output(log):  # never open the instance while it is created
            assert proc.poll() is None, f"the build ended (code {proc.returncode}) before it started:\n{_output(log)}"
            assert time.monotonic() < deadline, f"the build did not start within {timeout_s}s:\n{_output(log)}"
            time.sleep(0.2)
        with dg.DagsterInstance.from_config(str(home)) as instance:
            mine = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={PID_TAG: str(proc.pid)})
            while True:
                runs = [
                    run
                    for run in instance.get_runs(filters=mine)
                    if run.run_op_concurrency and GPU_POOL in run.run_op_concurrency.all_pools
                ]
                if runs:
                    children = run_processes(proc.pid)
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                    # its run processes die with it: nothing of the build goes on writing or leasing
                    gone = time.monotonic() + 30
                    while any(alive(c) for c in children) and time.monotonic() < gone:
                        time.sleep(0.1)
                    assert not any(alive(c) for c in children), f"run processes outlived the build: {children}"
                    return runs[0]
                assert proc.poll() is None, (
                    f"the build ended (code {proc.returncode}) before a run holding the {GPU_POOL!r} pool "
                    f"was seen STARTED:\n{_output(log)}"
                )
                assert time.monotonic() < deadline, f"no {GPU_POOL!r} run started within {timeout_s}s:\n{_output(log)}"
                time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
