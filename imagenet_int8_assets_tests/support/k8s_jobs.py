"""Test support: the Kubernetes launcher's config as the Helm chart passes it (with a fake, never
contacted kubeconfig) and readers/assertions for the Job specs it builds (recorded by
``k8s_recorder``). Used by dagster_layer/test_kubernetes.py (direct launches) and
servers/test_k8s_backfill_launches.py (launches by a real daemon)."""

from __future__ import annotations

from pathlib import Path

from imagenet_int8_assets.kubernetes import RUN_KIND_LABEL

CLASSES = ["n01440764", "n02102040", "n02979186", "n03000684"]  # the bundled sample's
CLASS_ASSETS = ("preprocessed_crops", "vae_latents", "mds_shards")
IMAGE = "registry.example/imagenet-int8:test"
NAMESPACE = "imagenet-int8"
GPU = "nvidia.com/gpu"
LABEL = "imagenet-int8/node-pool"
PVC_VOLUME = {"name": "data", "persistentVolumeClaim": {"claimName": "imagenet-int8-data"}}
PVC_MOUNT = {"name": "data", "mountPath": "/data"}
# Read by the launcher, never contacted: its server (port 1) would refuse a connection, so a test
# that reached the Kubernetes API would fail instead of passing.
FAKE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
- name: offline
  cluster: {server: "https://127.0.0.1:1"}
users:
- name: offline
  user: {token: not-a-token}
contexts:
- name: offline
  context: {cluster: offline, user: offline}
current-context: offline
"""


def launcher_config(tmp_path: Path) -> dict:
    """The launcher's config as the Helm chart's CustomRunLauncher would pass it (minus the
    in-cluster connection): image, namespace, service account, instance ConfigMap, the PostgreSQL
    password Secret, env and the shared volume."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(FAKE_KUBECONFIG)
    return {
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
        "job_image": IMAGE,
        "image_pull_policy": "Always",
        "job_namespace": NAMESPACE,
        "service_account_name": "dagster",
        "instance_config_map": "dagster-instance",
        "postgres_password_secret": "dagster-postgresql-secret",
        "dagster_home": "/opt/dagster/dagster_home",
        "env_config_maps": ["dagster-pipeline-env"],
        "env_vars": ["IMAGENET_INT8_OUTPUT=/data/out", "IMAGENET_INT8_VAE"],  # the second passes this process's value through
        "volumes": [PVC_VOLUME],
        "volume_mounts": [PVC_MOUNT],
    }


# ------------------------------------------------------------------------------------------
# reading a recorded Job


def container_of(job: dict) -> dict:
    containers = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, containers
    return containers[0]


def pod_spec_of(job: dict) -> dict:
    return job["spec"]["template"]["spec"]


def env_of(job: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container_of(job).get("env", [])}


def gpu_limit(job: dict) -> str | None:
    resources = container_of(job).get("resources") or {}
    return (resources.get("limits") or {}).get(GPU) or (resources.get("requests") or {}).get(GPU)


def assert_gpu_job(job: dict, node_pool: str = "gpu") -> None:
    assert gpu_limit(job) == "1", container_of(job).get("resources")
    spec = pod_spec_of(job)
    assert spec["nodeSelector"] == {LABEL: node_pool}, spec.get("nodeSelector")
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec.get("tolerations", []), spec.get("tolerations")
    assert job["spec"]["template"]["metadata"]["labels"][RUN_KIND_LABEL] == "gpu"
    assert job["metadata"]["labels"][RUN_KIND_LABEL] == "gpu"


def assert_cpu_job(job: dict) -> None:
    assert gpu_limit(job) is None, container_of(job).get("resources")
    spec = pod_spec_of(job)
    assert spec["nodeSelector"] == {LABEL: "cpu"}, spec.get("nodeSelector")
    assert not spec.get("tolerations"), spec.get("tolerations")
    assert job["spec"]["template"]["metadata"]["labels"][RUN_KIND_LABEL] == "cpu"


def assert_common(job: dict, run_id: str) -> None:
    """What every run pod gets from the launcher's config: image, command, Dagster env, the
    IMAGENET_INT8_* env, the shared volume."""
    container = container_of(job)
    assert container["image"] == IMAGE
    assert container["imagePullPolicy"] == "Always"
    assert container["args"][:3] == ["dagster", "api", "execute_run"], container["args"][:3]
    assert run_id in container["args"][3]
    env = env_of(job)
    assert env["DAGSTER_HOME"] == "/opt/dagster/dagster_home"
    assert env["DAGSTER_RUN_JOB_NAME"] == "__ASSET_JOB"
    assert env["DAGSTER_PG_PASSWORD"] == {"secretKeyRef": {"name": "dagster-postgresql-secret", "key": "postgresql-password"}}
    assert env["IMAGENET_INT8_OUTPUT"] == "/data/out"
    assert env["IMAGENET_INT8_VAE"] == "tiny-random"  # passed through from the launching process
    assert {"configMapRef": {"name": "dagster-pipeline-env"}} in container["envFrom"]
    assert PVC_MOUNT in container["volumeMounts"]
    spec = pod_spec_of(job)
    assert PVC_VOLUME in spec["volumes"]
    assert spec["serviceAccountName"] == "dagster"
    assert job["metadata"]["labels"]["dagster/run-id"] == run_id
