"""What a build reads back from its Dagster runs: progress (materializations) and failures."""

from __future__ import annotations

import threading
from collections.abc import Sequence


class RunProgress:
    """Advances a tqdm bar for every asset materialization recorded for one run.

    Each poll reads only the materializations recorded since the last one (a cursor): reading all of
    a run's every second cost about 0.3 ms per materialization per poll, growing with the run."""

    def __init__(self, instance, run_id: str, bar):
        self.instance, self.run_id, self.bar = instance, run_id, bar
        self.cursor: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _new(self) -> int:
        from dagster import DagsterEventType

        connection = self.instance.get_records_for_run(
            self.run_id, cursor=self.cursor, of_type=DagsterEventType.ASSET_MATERIALIZATION
        )
        self.cursor = connection.cursor
        return len(connection.records)

    def _update(self) -> None:
        try:
            new = self._new()
        except Exception:  # the run may not exist yet; progress is best-effort
            return
        if new:
            self.bar.update(new)

    def _poll(self) -> None:
        while not self.stop.wait(1.0):
            self._update()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self._update()


def error_text(error) -> str:
    """The innermost cause of a Dagster SerializableErrorInfo (the user's actual error).

    A ``dagster.Failure`` (a step's own one-line message: settings, nothing to build, disk full)
    is shown without its class name."""
    while error is not None and error.cause is not None:
        error = error.cause
    if error is None:
        return "failed"
    return error.message.strip().removeprefix("dagster._core.definitions.events.Failure: ")


def failure_lines(events) -> list[str]:
    """What went wrong in a run, one line each: failed steps (their innermost error) and failed
    checks, from its DagsterEvents."""
    lines = []
    for event in events:
        if event.event_type_value == "STEP_FAILURE":
            lines.append(f"{event.step_key}: {error_text(event.event_specific_data.error)}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION" and not event.event_specific_data.passed:
            data = event.event_specific_data
            lines.append(f"check {data.check_name} failed: {data.description or ''}")
    return lines


def run_failure_block(run_id: str, problems: Sequence[str], succeeded: bool) -> list[str]:
    """What a build reports for one of its runs: nothing when it succeeded without a problem,
    else ``run <id>:`` and each problem on an indented line (``failed`` when there is none)."""
    if not problems and succeeded:
        return []
    return [f"run {run_id}:"] + [f"  {p}" for p in problems or ["failed"]]
