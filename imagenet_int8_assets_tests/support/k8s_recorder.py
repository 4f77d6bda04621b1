"""Test support: the Kubernetes launcher with its Kubernetes API replaced by a recorder.

``JobRecorder`` stands in for ``kubernetes.client.BatchV1Api`` where dagster-k8s creates a Job
(``create_namespaced_job``): it keeps each Job body and, given a folder, also writes it there as
the JSON the Kubernetes API would receive (``ApiClient.sanitize_for_serialization``), one file per
Job. Everything before that call is dagster-k8s' and our launcher's own code.

``RecordingGpuAwareK8sRunLauncher`` is ``GpuAwareK8sRunLauncher`` with one more config field,
``record_dir``, so that an instance's dagster.yaml can name it (``run_launcher: {module:
imagenet_int8_assets_tests.support.k8s_recorder, class: RecordingGpuAwareK8sRunLauncher, config: ...}``)
and a real `dagster dev` daemon launches its runs through it: nothing reaches a cluster, the runs
stay STARTING, and their Jobs land in ``record_dir``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dagster import Field, StringSource
from dagster._utils.merger import merge_dicts

from imagenet_int8_assets.kubernetes import GpuAwareK8sRunLauncher


def job_json(body) -> dict:
    """A V1Job as the JSON the Kubernetes API receives (camelCase keys, no nulls)."""
    from kubernetes.client import ApiClient

    return ApiClient().sanitize_for_serialization(body)


class JobRecorder:
    """The one BatchV1Api call the run launcher makes to launch: records instead of creating."""

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else None
        self.jobs: list[tuple[str, dict]] = []  # (namespace, Job JSON)

    def create_namespaced_job(self, body, namespace, **_kwargs):
        job = job_json(body)
        self.jobs.append((namespace, job))
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{job['metadata']['name']}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"namespace": namespace, "job": job}, indent=1, sort_keys=True))
            os.replace(tmp, path)  # a reader never sees half a file
        return body


class RecordingGpuAwareK8sRunLauncher(GpuAwareK8sRunLauncher):
    def __init__(self, *args, record_dir: str, **kwargs):
        self.recorder = JobRecorder(record_dir)
        super().__init__(*args, k8s_client_batch_api=self.recorder, **kwargs)

    @classmethod
    def config_type(cls):
        return merge_dicts(
            super().config_type(),
            {"record_dir": Field(StringSource, description="Where each launched Job is written as JSON.")},
        )


def read_recorded_jobs(folder: str | os.PathLike) -> list[dict]:
    """The Jobs a ``RecordingGpuAwareK8sRunLauncher`` wrote: ``{"namespace": ..., "job": ...}`` each."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
