"""Kubernetes runs (imagenet_int8_assets/kubernetes.py), offline: the Job specs our launcher builds.

No cluster and no mocks of our code or of Dagster: runs of our definitions are created in a real
Dagster instance (from their execution plans, as Dagster creates every run) and launched through
``GpuAwareK8sRunLauncher``, i.e. through dagster-k8s' own ``K8sRunLauncher.launch_run`` and
``construct_dagster_k8s_job``. Only the last call, the Kubernetes API's ``create_namespaced_job``,
goes to a recorder (``k8s_recorder.JobRecorder``) that keeps the Job body as the API would receive
it; the kubeconfig is a minimal fake file (nothing connects to it).

- Direct launches: a class run (the encode step, pool ``gpu``) gets the GPU limit, the GPU node
  selector, the toleration, the image and the env; the manifest run, a dataset run and a class
  run of ``mds_shards`` alone get the CPU node selector and no GPU; ``resume_run`` builds the same
  spec; a ``dagster-k8s/config`` tag still applies and wins; the code location's container
  context (what the Helm chart's user deployment passes to runs) is kept but does not pull a GPU
  run off the GPU nodes; the instance loads the launcher and its options from dagster.yaml, as the
  Helm chart's ``CustomRunLauncher`` renders it.

The runs of backfills launched by a real daemon are in servers/test_k8s_backfill_launches.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._core.launcher import LaunchRunContext, ResumeRunContext
from dagster._core.storage.dagster_run import RunOpConcurrency

from imagenet_int8_assets.definitions import build_definitions
from imagenet_int8_assets.kubernetes import (
    GPU_POOL_ASSET_KEYS,
    GpuAwareK8sRunLauncher,
    run_uses_pool,
)
from imagenet_int8_assets.partitions import register_classes
from imagenet_int8_assets.resources import ImagenetInt8Settings
from imagenet_int8_assets_tests.support.builds import REPO
from imagenet_int8_assets_tests.support.k8s_jobs import (
    CLASS_ASSETS,
    CLASSES,
    GPU,
    IMAGE,
    LABEL,
    NAMESPACE,
    assert_common,
    assert_cpu_job,
    assert_gpu_job,
    container_of,
    env_of,
    gpu_limit,
    launcher_config,
    pod_spec_of,
)
from imagenet_int8_assets_tests.support.k8s_recorder import JobRecorder, read_recorded_jobs

pytestmark = pytest.mark.timeout(300)

DATASET_ASSETS = ("quantization_stats", "mds_dataset", "reconstruction_report", "probe_features", "latent_probe")


# ------------------------------------------------------------------------------------------
# direct launches


class Setup:
    """A real instance with the class partitions, our definitions' asset job, and a launcher
    whose Kubernetes API is a recorder."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **launcher_options):
        monkeypatch.setenv("IMAGENET_INT8_VAE", "tiny-random")  # for the env_vars pass-through
        home = tmp_path / "home"
        home.mkdir()
        self.instance = dg.DagsterInstance.local_temp(str(home))
        register_classes(self.instance, CLASSES)
        settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1)
        self.defs = build_definitions(settings, partitions_per_run=2)
        self.job = self.defs.resolve_implicit_global_asset_job_def()
        # where a run pod loads the code from: the module, as workspace.yaml and the Helm chart say
        repository = ReconstructableRepository.for_module("imagenet_int8_assets", "defs", working_directory=str(REPO))
        self.origin = repository.get_reconstructable_job(self.job.name).get_python_origin()
        self.recorder = JobRecorder()
        self.launcher = GpuAwareK8sRunLauncher(
            k8s_client_batch_api=self.recorder, **{**launcher_config(tmp_path), **launcher_options}
        )
        self.launcher.register_instance(self.instance)

    def create_run(self, assets, classes=None, tags=None, origin=None):
        """A run of ``assets`` (over the class range ``classes``), created from its plan; read
        back from storage, as the launcher gets it from the queue."""
        tags = dict(tags or {})
        if classes:
            tags.update({"dagster/asset_partition_range_start": classes[0], "dagster/asset_partition_range_end": classes[-1]})
        run = self.instance.create_run_for_job(
            self.job,
            asset_selection={dg.AssetKey(a) for a in assets},
            tags=tags,
            job_code_origin=origin or self.origin,
        )
        return self.instance.get_run_by_id(run.run_id)

    def launch(self, run) -> dict:
        before = len(self.recorder.jobs)
        self.launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
        assert len(self.recorder.jobs) == before + 1
        namespace, job = self.recorder.jobs[-1]
        assert namespace == NAMESPACE
        return job


@pytest.fixture
def setup(tmp_path, monkeypatch) -> Setup:
    return Setup(tmp_path, monkeypatch)


def test_class_run_gets_a_gpu_on_a_gpu_node(setup: Setup):
    run = setup.create_run(CLASS_ASSETS, CLASSES[:2])
    assert run.run_op_concurrency is not None and run.run_op_concurrency.all_pools == {"gpu"}
    job = setup.launch(run)
    assert_gpu_job(job)
    assert_common(job, run.run_id)
    assert job["metadata"]["name"] == f"dagster-run-{run.run_id}"

    # a resumed run (run monitoring, after its pod died) is built by the same code: same spec
    setup.launcher.resume_run(ResumeRunContext(dagster_run=run, workspace=None, resume_attempt_number=1))
    _, resumed = setup.recorder.jobs[-1]
    assert resumed["metadata"]["name"] == f"dagster-run-{run.run_id}-1"
    assert_gpu_job(resumed)
    assert container_of(resumed)["args"][:3] == ["dagster", "api", "resume_run"]

    # either asset of the step alone holds the pool too (docs/BEYOND_ONE_MACHINE.md: the pool belongs to the step)
    for asset in ("vae_latents", "preprocessed_crops"):
        assert_gpu_job(setup.launch(setup.create_run([asset], CLASSES[2:])))


def test_other_runs_get_cpu_nodes_and_no_gpu(setup: Setup):
    runs = {
        "manifest": setup.create_run(["raw_manifest"]),
        "dataset": setup.create_run(DATASET_ASSETS),
        "shards alone": setup.create_run(["mds_shards"], CLASSES),
    }
    for what, run in runs.items():
        assert run.run_op_concurrency is None, what  # planned, and no step in a pool
        job = setup.launch(run)
        assert_cpu_job(job)
        assert_common(job, run.run_id)


def test_user_k8s_config_tag_still_applies_and_wins(setup: Setup):
    user = {
        "container_config": {"resources": {"limits": {"memory": "96Gi"}, "requests": {"cpu": "15"}}},
        "pod_spec_config": {"node_selector": {LABEL: "gpu-a100"}, "priority_class_name": "batch-high"},
        "pod_template_spec_metadata": {"annotations": {"team": "vision"}},
    }
    run = setup.create_run(CLASS_ASSETS, CLASSES, tags={"dagster-k8s/config": json.dumps(user)})
    job = setup.launch(run)
    # the tag's node pool replaced ours (one label key), the rest of ours is still there
    assert_gpu_job(job, node_pool="gpu-a100")
    resources = container_of(job)["resources"]
    assert resources == {"limits": {GPU: "1", "memory": "96Gi"}, "requests": {"cpu": "15"}}, resources
    assert pod_spec_of(job)["priorityClassName"] == "batch-high"
    assert job["spec"]["template"]["metadata"]["annotations"] == {"team": "vision"}

    # and a CPU run's tag can ask for a GPU node (the tag wins over the pool's choice)
    tag = {"pod_spec_config": {"node_selector": {LABEL: "gpu"}}}
    job = setup.launch(setup.create_run(["reconstruction_report"], tags={"dagster-k8s/config": json.dumps(tag)}))
    assert pod_spec_of(job)["nodeSelector"] == {LABEL: "gpu"}
    assert gpu_limit(job) is None


def test_code_location_context_is_kept_but_the_pool_decides_the_node(setup: Setup):
    """What the Helm chart's user deployment hands to runs (its image, env, volumes, resources;
    here also a node selector) applies, but the run's pool config comes after it."""
    context = {
        "k8s": {
            "env_vars": ["IMAGENET_INT8_SOURCE=/data/imagenet/train"],
            "resources": {"requests": {"memory": "8Gi"}},
            "run_k8s_config": {"pod_spec_config": {"node_selector": {LABEL: "cpu"}}},
        }
    }
    repository_origin = setup.origin.repository_origin._replace(
        container_image="registry.example/imagenet-int8:code-location", container_context=context
    )
    origin = setup.origin._replace(repository_origin=repository_origin)
    gpu_job = setup.launch(setup.create_run(CLASS_ASSETS, CLASSES, origin=origin))
    assert_gpu_job(gpu_job)
    assert container_of(gpu_job)["image"] == "registry.example/imagenet-int8:code-location"
    assert env_of(gpu_job)["IMAGENET_INT8_SOURCE"] == "/data/imagenet/train"
    assert container_of(gpu_job)["resources"] == {"limits": {GPU: "1"}, "requests": {"memory": "8Gi"}}
    cpu_job = setup.launch(setup.create_run(["raw_manifest"], origin=origin))
    assert_cpu_job(cpu_job)


def test_options_per_kind(tmp_path, monkeypatch):
    """The launcher's own options: GPUs per run, label and pools, tolerations and raw config per
    kind (Kubernetes fields in camelCase accepted, as in dagster-k8s' run_k8s_config)."""
    setup = Setup(
        tmp_path,
        monkeypatch,
        gpus_per_run=2,
        node_pool_label="cloud.example/pool",
        gpu_node_pool="h100",
        cpu_node_pool="general",
        gpu_tolerations=[{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        gpu_run_k8s_config={
            "container_config": {
                "resources": {"requests": {"cpu": "15", "memory": "60Gi"}},
                "env": [{"name": "IMAGENET_INT8_DEVICE", "value": "cuda"}, {"name": "IMAGENET_INT8_WORKERS", "value": "14"}],
            },
            "pod_spec_config": {"priorityClassName": "gpu-batch"},
        },
        cpu_run_k8s_config={"container_config": {"resources": {"requests": {"cpu": "2", "memory": "8Gi"}}}},
    )
    gpu_job = setup.launch(setup.create_run(CLASS_ASSETS, CLASSES))
    assert container_of(gpu_job)["resources"] == {"limits": {GPU: "2"}, "requests": {"cpu": "15", "memory": "60Gi"}}
    assert pod_spec_of(gpu_job)["nodeSelector"] == {"cloud.example/pool": "h100"}
    assert pod_spec_of(gpu_job)["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert env_of(gpu_job)["IMAGENET_INT8_DEVICE"] == "cuda" and env_of(gpu_job)["IMAGENET_INT8_WORKERS"] == "14"
    assert pod_spec_of(gpu_job)["priorityClassName"] == "gpu-batch"
    cpu_job = setup.launch(setup.create_run(["raw_manifest"]))
    assert container_of(cpu_job)["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}}
    assert pod_spec_of(cpu_job)["nodeSelector"] == {"cloud.example/pool": "general"}
    assert "IMAGENET_INT8_DEVICE" not in env_of(cpu_job)

    # node_pool_label null: no node selector at all; gpus_per_run 0: no GPU request
    bare = GpuAwareK8sRunLauncher(k8s_client_batch_api=setup.recorder, node_pool_label=None, gpus_per_run=0, **launcher_config(tmp_path))
    bare.register_instance(setup.instance)
    bare.launch_run(LaunchRunContext(dagster_run=setup.create_run(CLASS_ASSETS, CLASSES), workspace=None))
    _, job = setup.recorder.jobs[-1]
    assert "nodeSelector" not in pod_spec_of(job) and gpu_limit(job) is None
    assert pod_spec_of(job)["tolerations"]  # still tolerates the GPU nodes' taint
    with pytest.raises(ValueError, match="containerConfig"):  # a misspelt key is refused, not ignored
        GpuAwareK8sRunLauncher(gpu_run_k8s_config={"containerConfig": {}}, **launcher_config(tmp_path))


def test_pool_decision_without_a_plan(setup: Setup):
    """run_uses_pool's fallbacks, on runs as stored by older Dagster versions or created without a
    plan; and the fallback asset keys are those of the gpu pool's step in our definitions."""
    graph = setup.defs.resolve_asset_graph()
    in_pool = {key for key in graph.get_all_asset_keys() if "gpu" in (graph.get(key).pools or set())}
    assert in_pool == GPU_POOL_ASSET_KEYS

    class_run = setup.create_run(CLASS_ASSETS, CLASSES)
    manifest_run = setup.create_run(["raw_manifest"])
    assert run_uses_pool(class_run) and not run_uses_pool(manifest_run)
    # serialized before all_pools existed: the root steps' pools
    old = class_run._replace(run_op_concurrency=RunOpConcurrency(root_key_counts={"gpu": 1}, has_unconstrained_root_nodes=False))
    assert run_uses_pool(old)
    # no plan: the asset selection decides; no plan and no selection: a GPU, the safe side
    unplanned = {"run_op_concurrency": None, "execution_plan_snapshot_id": None}
    assert run_uses_pool(class_run._replace(**unplanned))
    assert not run_uses_pool(manifest_run._replace(**unplanned))
    assert run_uses_pool(manifest_run._replace(asset_selection=None, **unplanned))


def test_instance_loads_the_launcher_from_dagster_yaml(tmp_path, monkeypatch):
    """The Helm chart's CustomRunLauncher renders `run_launcher: {module, class, config}` into the
    instance's dagster.yaml: the config schema takes our options, with their defaults."""
    monkeypatch.setenv("IMAGENET_INT8_VAE", "tiny-random")
    home = tmp_path / "home"
    home.mkdir()
    config = {**launcher_config(tmp_path), "record_dir": str(tmp_path / "jobs"), "gpu_run_k8s_config": {"container_config": {"env": [{"name": "IMAGENET_INT8_DEVICE", "value": "cuda"}]}}}
    instance_yaml = {
        "run_launcher": {"module": "imagenet_int8_assets_tests.support.k8s_recorder", "class": "RecordingGpuAwareK8sRunLauncher", "config": config},
        "telemetry": {"enabled": False},
    }
    (home / "dagster.yaml").write_text(json.dumps(instance_yaml))  # JSON is YAML
    with dg.DagsterInstance.from_config(str(home)) as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, GpuAwareK8sRunLauncher)
        assert (launcher.gpu_pool, launcher.gpus_per_run, launcher.node_pool_label) == ("gpu", 1, LABEL)
        assert launcher.gpu_tolerations == [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}]
        # a class run launched the way the queue daemon does it (instance.launch_run)
        register_classes(instance, CLASSES)
        settings = ImagenetInt8Settings(output=str(tmp_path / "out"), vae="tiny-random", device="cpu", workers=1)
        job = build_definitions(settings, partitions_per_run=4).resolve_implicit_global_asset_job_def()
        origin = ReconstructableRepository.for_module("imagenet_int8_assets", "defs", working_directory=str(REPO))
        run = instance.create_run_for_job(
            job,
            asset_selection={dg.AssetKey(a) for a in CLASS_ASSETS},
            tags={"dagster/asset_partition_range_start": CLASSES[0], "dagster/asset_partition_range_end": CLASSES[-1]},
            job_code_origin=origin.get_reconstructable_job(job.name).get_python_origin(),
        )
        instance.launch_run(run.run_id, workspace=None)
        [recorded] = read_recorded_jobs(tmp_path / "jobs")
        assert recorded["namespace"] == NAMESPACE
        assert_gpu_job(recorded["job"])
        assert_common(recorded["job"], run.run_id)
        assert env_of(recorded["job"])["IMAGENET_INT8_DEVICE"] == "cuda"
        assert instance.get_run_by_id(run.run_id).tags["dagster/image"] == IMAGE


def test_deploy_values_launcher_config(tmp_path, monkeypatch):
    """deploy/values.yaml: the run launcher config it gives the chart's CustomRunLauncher passes
    our launcher's config schema, and with the container context that the chart's user deployment
    hands to runs (the dagsterUserDeployments.k8sContainerContext template, rendered by hand here
    from the same values) a class run and a manifest run get the intended pods."""
    import yaml
    from dagster._config import process_config

    values = yaml.safe_load((REPO / "deploy" / "values.yaml").read_text())
    custom = values["runLauncher"]["config"]["customRunLauncher"]
    assert values["runLauncher"]["type"] == "CustomRunLauncher"
    assert (custom["module"], custom["class"]) == ("imagenet_int8_assets.kubernetes", "GpuAwareK8sRunLauncher")
    config = {**custom["config"], "load_incluster_config": False, "kubeconfig_file": launcher_config(tmp_path)["kubeconfig_file"]}
    processed = process_config(GpuAwareK8sRunLauncher.config_type(), config)
    assert processed.success, processed.errors
    assert values["concurrency"]["pools"]["granularity"] == "run"

    [deployment] = values["dagster-user-deployments"]["deployments"]
    chart_context = {  # what the chart passes as the code location's container context
        "k8s": {
            "image_pull_policy": deployment["image"]["pullPolicy"],
            "env_config_maps": [f"dagster-{deployment['name']}-user-env"],
            "volume_mounts": deployment["volumeMounts"],
            "volumes": deployment["volumes"],
            "namespace": "imagenet-int8",
            "service_account_name": "dagster-user-deployments",
            "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
        }
    }
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"

    setup = Setup(tmp_path, monkeypatch)
    launcher = GpuAwareK8sRunLauncher(k8s_client_batch_api=setup.recorder, **processed.value)
    launcher.register_instance(setup.instance)
    repository_origin = setup.origin.repository_origin._replace(container_image=image, container_context=chart_context)
    origin = setup.origin._replace(repository_origin=repository_origin)
    jobs = {}
    for kind, assets, classes in (("gpu", CLASS_ASSETS, CLASSES), ("cpu", ["raw_manifest"], None)):
        launcher.launch_run(LaunchRunContext(dagster_run=setup.create_run(assets, classes, origin=origin), workspace=None))
        namespace, jobs[kind] = setup.recorder.jobs[-1]
        assert namespace == "imagenet-int8"
    for kind, job in jobs.items():
        container, spec = container_of(job), pod_spec_of(job)
        assert container["image"] == image
        # the shared volume once (launcher and code location name the same one), /dev/shm enlarged
        assert [v["name"] for v in spec["volumes"]] == ["data", "dshm"], spec["volumes"]
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/data", "/dev/shm"]
        assert {"configMapRef": {"name": "dagster-imagenet-int8-user-env"}} in container["envFrom"]
        assert {"configMapRef": {"name": "dagster-pipeline-env"}} in container["envFrom"]
    assert_gpu_job(jobs["gpu"])
    assert container_of(jobs["gpu"])["resources"] == {
        "limits": {GPU: "1", "memory": "96Gi"}, "requests": {"cpu": "16", "memory": "64Gi"}
    }
    assert env_of(jobs["gpu"])["IMAGENET_INT8_DEVICE"] == "cuda"
    assert_cpu_job(jobs["cpu"])
    assert container_of(jobs["cpu"])["resources"] == {"limits": {"memory": "32Gi"}, "requests": {"cpu": "4", "memory": "16Gi"}}
    assert "IMAGENET_INT8_DEVICE" not in env_of(jobs["cpu"])
