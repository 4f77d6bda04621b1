"""Kubernetes runs: one pod per run, and a GPU only for the runs that encode.

``GpuAwareK8sRunLauncher`` is dagster-k8s' ``K8sRunLauncher`` (one Kubernetes Job per run, the
run's whole process in its pod: our executor is ``in_process_executor``) that decides per run
which node pool the pod goes to. A run whose plan holds a step of the Dagster pool ``gpu`` (the
``crops_and_latents`` step, which crops on the pod's CPUs and encodes on its GPU) gets

- the container resource limit ``nvidia.com/gpu: <gpus_per_run>`` (default 1: a run leases one
  device, ``core/latents/devices.py``, so a second GPU per pod would sit idle),
- the node selector ``<node_pool_label>: <gpu_node_pool>`` (default ``imagenet-int8/node-pool: gpu``),
- the tolerations ``gpu_tolerations`` (default: ``nvidia.com/gpu`` Exists NoSchedule, the taint
  GPU node pools usually carry), and ``gpu_run_k8s_config`` (raw Kubernetes config, e.g. CPU and
  memory requests for the crop workers, ``IMAGENET_INT8_WORKERS``, ``IMAGENET_INT8_DEVICE=cuda``);

every other run (the manifest, ``mds_shards`` alone, the dataset assets) gets
``<node_pool_label>: <cpu_node_pool>`` and ``cpu_run_k8s_config``. One label key serves both
kinds on purpose: Kubernetes config is deep-merged (dicts merge key by key, lists are appended),
so a ``dagster-k8s/config`` tag that sets the same key moves the pod to another pool instead of
adding a second, contradictory requirement.

Why in the launcher and not in tags. Dagster's own way to give a job Kubernetes config is the
``dagster-k8s/config`` tag, but in Dagster 1.13.27 a run created by an asset backfill (the UI's
"Materialize all", the daemon) carries only its run request's tags and the backfill's tags
(``dagster/_core/execution/asset_backfill.py``, ``_submit_runs_and_update_backfill_in_chunks``):
tags set on the asset job or the assets never reach those runs (dagster-io/dagster issues #26720,
#33430, #22865, #20429, #23298, #8979). Backfills are how the class runs are made, so the GPU request cannot come from
tags. What every run does carry is the pools of the steps it will execute:
``DagsterRun.run_op_concurrency.all_pools``, computed from the run's execution plan when the run is
created (``dagster/_core/instance/runs/run_domain.py``, ``create_run``; the same call for backfill
runs, runs launched from the UI, sensors, schedules and re-executions). ``run_uses_pool`` reads it.

Merge order, lowest first: the launcher's own config (``env_vars``, ``volumes``, ``run_k8s_config``
...), the code location's container context (the Helm chart's user deployment: its env, volumes,
resources), this per-run pool config, then the run's ``dagster-k8s/config`` tags, which win as in
dagster-k8s. A code location that sets a node selector therefore does not pull GPU runs off the
GPU pool, and a user tag still can.

The Dagster ``gpu`` pool limit is a per-instance count of runs holding the pool at once
(``granularity: run``): set it to the number of GPUs the cluster offers this deployment divided
by ``gpus_per_run`` (``dagster instance concurrency set gpu N``), or GPU runs wait in the queue
while GPUs idle, or wait Pending for a GPU in Kubernetes instead of in Dagster's queue.

Used by the Helm chart as ``runLauncher.type: CustomRunLauncher`` with module
``imagenet_int8_assets.kubernetes``, class ``GpuAwareK8sRunLauncher`` (deploy/values.yaml). The
daemon (which launches queued and backfill runs) and the webserver import it, so their image must
contain this package. The definitions never import this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dagster import Array, AssetKey, Field, IntSource, Noneable, Permissive, Shape, StringSource
from dagster._core.storage.dagster_run import DagsterRun
from dagster._utils.merger import merge_dicts
from dagster_k8s import K8sRunLauncher
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import UserDefinedDagsterK8sConfig, get_user_defined_k8s_config

from imagenet_int8_assets.build.instance import GPU_POOL

# GPU_POOL: the pool of the crops_and_latents step (assets/crops_and_latents.py)
# The assets of the step in the gpu pool; only consulted for a run created without an execution
# plan (see run_uses_pool). A test checks them against the definitions.
GPU_POOL_ASSET_KEYS = frozenset({AssetKey("preprocessed_crops"), AssetKey("vae_latents")})
NODE_POOL_LABEL = "imagenet-int8/node-pool"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_TOLERATIONS = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
RUN_KIND_LABEL = "imagenet-int8/run-kind"  # on the Job and its pod: gpu or cpu (kubectl get pods -l ...)

RAW_K8S_CONFIG = Shape(
    {
        "container_config": Field(Permissive(), is_required=False),
        "pod_template_spec_metadata": Field(Permissive(), is_required=False),
        "pod_spec_config": Field(Permissive(), is_required=False),
        "job_config": Field(Permissive(), is_required=False),
        "job_metadata": Field(Permissive(), is_required=False),
        "job_spec_config": Field(Permissive(), is_required=False),
    }
)


def run_uses_pool(
    run: DagsterRun, pool: str = GPU_POOL, fallback_asset_keys: Iterable[AssetKey] = GPU_POOL_ASSET_KEYS
) -> bool:
    """Whether ``run`` will execute a step of ``pool``.

    From the run's plan: ``run.run_op_concurrency`` is computed from the execution plan when the
    run is created (the plan's steps to execute, with their pools), for every run Dagster creates
    from a plan: backfill runs, UI launches, ``dagster asset materialize``, sensors, schedules,
    re-executions and retries. It is None exactly when no step of the plan is in a pool (a CPU
    run) or when the run was created without a plan; ``execution_plan_snapshot_id`` tells the two
    apart. Runs serialized before ``all_pools`` existed have only ``root_key_counts`` (the pools of
    the root steps, where a class run's step is).

    Without a plan (a run created by hand, or by a tool that skips the plan), the run's asset
    selection decides: a run selecting an asset of the step in ``pool`` needs it. A run that says
    neither (no plan, no asset selection: a whole-job run of unknown content) is treated as needing
    it: such a run on a GPU node only costs a GPU while it runs, the same run on a CPU node would
    encode on the CPU for hours.
    """
    concurrency = run.run_op_concurrency
    if concurrency is not None:
        pools = concurrency.all_pools if concurrency.all_pools is not None else concurrency.root_key_counts.keys()
        return pool in pools
    if run.execution_plan_snapshot_id is not None:
        return False  # planned, and no step of the plan is in any pool
    if run.asset_selection is not None:
        return not run.asset_selection.isdisjoint(set(fallback_asset_keys))
    return True


def _raw_k8s_config(value: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """``value`` checked: only the keys of dagster-k8s' run_k8s_config (a misspelt key would
    otherwise be ignored without a word, as ``UserDefinedDagsterK8sConfig.from_dict`` does)."""
    value = dict(value or {})
    unknown = sorted(set(value) - set(RAW_K8S_CONFIG.fields))
    if unknown:
        raise ValueError(f"{name}: unknown keys {unknown}; use {sorted(RAW_K8S_CONFIG.fields)} (snake_case)")
    return value


class GpuAwareK8sRunLauncher(K8sRunLauncher):
    """``K8sRunLauncher`` that sends the runs of the ``gpu`` pool to GPU nodes with a GPU each,
    and every other run to CPU nodes (module docstring). Configured like ``K8sRunLauncher``, plus:

    - ``gpu_pool`` (default ``gpu``): the Dagster pool whose runs need a GPU.
    - ``gpus_per_run`` (default 1): the ``gpu_resource`` limit of those runs (0: no GPU request,
      e.g. when GPUs are handed out another way; the node selector and tolerations still apply).
    - ``gpu_resource`` (default ``nvidia.com/gpu``): the extended resource the device plugin offers.
    - ``node_pool_label`` (default ``imagenet-int8/node-pool``; null: no node selectors), with
      ``gpu_node_pool`` (default ``gpu``) and ``cpu_node_pool`` (default ``cpu``) its values.
    - ``gpu_tolerations`` (default: ``nvidia.com/gpu`` Exists NoSchedule): GPU runs only.
    - ``gpu_run_k8s_config`` / ``cpu_run_k8s_config``: raw Kubernetes config for each kind, the
      same keys as ``run_k8s_config`` (container_config, pod_spec_config, ...), the Kubernetes
      fields inside them in snake or camel case.
    """

    def __init__(
        self,
        *args,
        gpu_pool: str = GPU_POOL,
        gpus_per_run: int = 1,
        gpu_resource: str = GPU_RESOURCE,
        node_pool_label: str | None = NODE_POOL_LABEL,
        gpu_node_pool: str = "gpu",
        cpu_node_pool: str = "cpu",
        gpu_tolerations: Sequence[Mapping[str, Any]] | None = None,
        gpu_run_k8s_config: Mapping[str, Any] | None = None,
        cpu_run_k8s_config: Mapping[str, Any] | None = None,
        **kwargs,
    ):
        if gpus_per_run < 0:
            raise ValueError(f"gpus_per_run={gpus_per_run}: use 0 (no GPU request) or more")
        self.gpu_pool = gpu_pool
        self.gpus_per_run = gpus_per_run
        self.gpu_resource = gpu_resource
        self.node_pool_label = node_pool_label or None
        self.gpu_node_pool = gpu_node_pool
        self.cpu_node_pool = cpu_node_pool
        self.gpu_tolerations = [dict(t) for t in (DEFAULT_GPU_TOLERATIONS if gpu_tolerations is None else gpu_tolerations)]
        self.gpu_run_k8s_config = _raw_k8s_config(gpu_run_k8s_config, "gpu_run_k8s_config")
        self.cpu_run_k8s_config = _raw_k8s_config(cpu_run_k8s_config, "cpu_run_k8s_config")
        super().__init__(*args, **kwargs)

    @classmethod
    def config_type(cls):
        return merge_dicts(
            super().config_type(),
            {
                "gpu_pool": Field(StringSource, is_required=False, default_value=GPU_POOL,
                                  description="The Dagster pool whose runs need a GPU."),
                "gpus_per_run": Field(IntSource, is_required=False, default_value=1,
                                      description="GPUs requested by each run of the gpu pool (a run encodes on one)."),
                "gpu_resource": Field(StringSource, is_required=False, default_value=GPU_RESOURCE,
                                      description="The extended resource name of a GPU (the device plugin's)."),
                "node_pool_label": Field(Noneable(StringSource), is_required=False, default_value=NODE_POOL_LABEL,
                                         description="Node label key whose value picks the node pool of a run; null: no node selector."),
                "gpu_node_pool": Field(StringSource, is_required=False, default_value="gpu",
                                       description="node_pool_label value of the nodes for runs of the gpu pool."),
                "cpu_node_pool": Field(StringSource, is_required=False, default_value="cpu",
                                       description="node_pool_label value of the nodes for every other run."),
                "gpu_tolerations": Field(Array(Permissive()), is_required=False,
                                         default_value=[dict(t) for t in DEFAULT_GPU_TOLERATIONS],
                                         description="Tolerations of runs of the gpu pool (the GPU nodes' taints)."),
                "gpu_run_k8s_config": Field(RAW_K8S_CONFIG, is_required=False,
                                            description="Raw Kubernetes config for runs of the gpu pool."),
                "cpu_run_k8s_config": Field(RAW_K8S_CONFIG, is_required=False,
                                            description="Raw Kubernetes config for every other run."),
            },
        )

    def uses_gpu(self, run: DagsterRun) -> bool:
        return run_uses_pool(run, self.gpu_pool)

    def pool_container_context(self, run: DagsterRun) -> K8sContainerContext:
        """The Kubernetes config this run gets for its kind (GPU or CPU), before its tags."""
        gpu = self.uses_gpu(run)
        kind = "gpu" if gpu else "cpu"
        container: dict[str, Any] = {}
        pod_spec: dict[str, Any] = {}
        if gpu and self.gpus_per_run > 0:
            container["resources"] = {"limits": {self.gpu_resource: str(self.gpus_per_run)}}
        if self.node_pool_label:
            pod_spec["node_selector"] = {self.node_pool_label: self.gpu_node_pool if gpu else self.cpu_node_pool}
        if gpu and self.gpu_tolerations:
            pod_spec["tolerations"] = self.gpu_tolerations
        ours = UserDefinedDagsterK8sConfig(
            container_config=container,
            pod_spec_config=pod_spec,
            pod_template_spec_metadata={"labels": {RUN_KIND_LABEL: kind}},
            job_metadata={"labels": {RUN_KIND_LABEL: kind}},
        )
        extra = UserDefinedDagsterK8sConfig.from_dict(self.gpu_run_k8s_config if gpu else self.cpu_run_k8s_config)
        return K8sContainerContext(run_k8s_config=ours).merge(K8sContainerContext(run_k8s_config=extra))

    def get_container_context_for_run(self, dagster_run: DagsterRun) -> K8sContainerContext:
        """dagster-k8s' container context with the run's pool config merged in before its tags.

        Every Kubernetes call of the launcher goes through here: ``launch_run`` and ``resume_run``
        (both build the Job in ``_launch_k8s_job_with_args``), ``terminate``, the health check and
        the debug info (which only need the namespace).
        """
        # the launcher's config, then the code location's container context (allowlist checked)
        context = K8sContainerContext.create_for_run(dagster_run, self, include_run_tags=False)
        # the run's dagster-k8s/config tags, checked against the same allowlist as dagster-k8s does
        tags = K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(dagster_run.tags))
        tags = tags.validate_user_k8s_config_for_run(
            self.only_allow_user_defined_k8s_config_fields, self.only_allow_user_defined_env_vars
        )
        return context.merge(self.pool_container_context(dagster_run)).merge(tags)
