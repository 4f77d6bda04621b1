"""Runs of a killed ``imagenet-int8`` build: detect them and fail them, so nothing waits on them.

The CLI executes its runs in its own process (``execute_in_process``), its class runs in run
processes that die with it (``class_runs``). When it is killed, its runs stay STARTED forever, and with the ``gpu`` pool at run granularity the queue
coordinator counts every active run that uses the pool against the limit: a backfill launched
later from the UI waits in QUEUED. Dagster's run monitoring cannot help: it asks the run launcher
about the run's worker, and no launcher started these runs.

So the CLI tags each of its runs (class runs included) with its host, pid and process start token
(``process_run_tags``), and ``fail_dead_build_runs`` marks every unfinished run so tagged whose
process is gone as FAILURE and frees any concurrency slots it holds. The CLI calls it on every
start; ``dead_build_runs_sensor`` (running by default) calls it from the Dagster daemon, so with
``dagster dev`` a killed build's run is failed within seconds and queued runs proceed. Runs
recorded on another host, and runs without these tags (launched by Dagster itself), are left alone.
"""

from __future__ import annotations

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunsFilter,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)

from imagenet_int8_assets.core.common.build_lock import current_host, process_identity, process_is_alive

HOST_TAG = "imagenet-int8/host"
PID_TAG = "imagenet-int8/pid"
START_TAG = "imagenet-int8/process-start"
UNFINISHED = [
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
    DagsterRunStatus.CANCELING,
]
SENSOR_INTERVAL_S = 15


def process_run_tags() -> dict[str, str]:
    """The tags that tie a run to this process (host, pid, start token)."""
    me = process_identity()
    return {HOST_TAG: str(me["host"]), PID_TAG: str(me["pid"]), START_TAG: str(me["start_token"])}


def dead_run_message(tags: dict[str, str]) -> str:
    return (
        f"The imagenet-int8 build process that ran this run (pid {tags.get(PID_TAG)} on "
        f"{tags.get(HOST_TAG)}) died without finishing it; marked as failed so that it no longer "
        "holds its concurrency pool. Run the build (or a backfill) again to redo its steps."
    )


def fail_dead_build_runs(instance: DagsterInstance) -> list[str]:
    """Fail the unfinished CLI runs of this host whose process has died; returns their run ids."""
    host = current_host()
    records = instance.get_run_records(filters=RunsFilter(statuses=UNFINISHED, tags={HOST_TAG: host}))
    failed = []
    for record in records:
        run = record.dagster_run
        try:
            pid = int(run.tags.get(PID_TAG, ""))
        except ValueError:
            continue
        if process_is_alive(pid, run.tags.get(START_TAG, "")):
            continue
        current = instance.get_run_by_id(run.run_id)
        if current is None or current.status not in UNFINISHED:  # finished meanwhile
            continue
        fail_run(instance, current, dead_run_message(current.tags))
        failed.append(run.run_id)
    return failed


def fail_run(instance: DagsterInstance, run, message: str) -> None:
    """Mark an unfinished run FAILURE with ``message`` and free the concurrency slots it holds."""
    instance.report_run_failed(run, message)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)


@sensor(
    name="fail_dead_build_runs",
    minimum_interval_seconds=SENSOR_INTERVAL_S,
    default_status=DefaultSensorStatus.RUNNING,
    description=(
        "Marks runs of a killed `imagenet-int8 build` on this host as failed and frees their "
        "concurrency slots, so queued runs and backfills are not blocked by them."
    ),
)
def dead_build_runs_sensor(context: SensorEvaluationContext):
    failed = fail_dead_build_runs(context.instance)
    if failed:
        context.log.warning(f"Marked {len(failed)} run(s) of dead imagenet-int8 builds as failed: {', '.join(failed)}")
        return SkipReason(f"marked {len(failed)} run(s) of dead builds as failed: {', '.join(failed)}")
    return SkipReason("no run of a dead imagenet-int8 build")
