"""Test support: the helpers that build things the way a user does.

Generated sources (``make_image_folder``, ``crops``), the real CLI in a subprocess (``BIN``,
``cli_env``, ``run_cli``), the whole graph materialized in process as `imagenet-int8 build --force`
does (``materialize_all``), which classes a build encoded (``encoded_classes``) and torch's thread
count for a block (``torch_threads``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import dagster as dg

from imagenet_int8_assets.build.stages import DATASET_STEPS
from imagenet_int8_assets.sample import synthetic_picture

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # where `imagenet-int8` and `dagster` are installed


def cli_env(tmp_path: Path, **extra: str) -> dict:
    """Environment for the real CLI in a subprocess: output under ``tmp_path``, tiny VAE on CPU,
    offline, none of the caller's IMAGENET_INT8_* or DAGSTER_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGENET_INT8_", "DAGSTER_HOME"))}
    env.update(
        IMAGENET_INT8_OUTPUT=str(tmp_path / "out"),
        IMAGENET_INT8_VAE="tiny-random",
        IMAGENET_INT8_DEVICE="cpu",
        IMAGENET_INT8_WORKERS="1",
        TMPDIR=os.environ.get("TMPDIR", tempfile.gettempdir()),
        HF_HUB_OFFLINE="1",
        HF_HUB_CACHE=str(tmp_path / "hf-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_cli(args, env: dict, cwd=REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def crops(n: int, seed: int = 0):
    """``n`` distinct 256x256 RGB synthetic pictures as one uint8 array (N, 256, 256, 3)."""
    import numpy as np

    return np.stack(
        [np.asarray(synthetic_picture(256, 256, (40 + 30 * i % 200, 90, 120), seed=seed + i).convert("RGB")) for i in range(n)]
    )


def make_image_folder(root: Path, classes: dict[str, int], size=(300, 240)) -> Path:
    """``classes`` maps class folder -> number of JPEGs; returns ``root``."""
    for c, (name, count) in enumerate(sorted(classes.items())):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            w, h = size if i % 2 == 0 else size[::-1]
            synthetic_picture(w, h, (40 + 50 * c % 200, 90, 200 - 40 * c % 200), seed=97 * c + i).save(
                folder / f"{name}_{i:04d}.JPEG", quality=90
            )
    return root


def encoded_classes(out: Path) -> dict[str, int]:
    """How many vae_latents materializations each class has in the instance of the output ``out``
    (its default DAGSTER_HOME): which classes a build encoded, and how often."""
    with dg.DagsterInstance.from_config(str(out / "dagster_home")) as instance:
        records = instance.fetch_materializations(dg.AssetKey("vae_latents"), limit=1000).records
    counts: dict[str, int] = {}
    for record in records:
        counts[record.partition_key] = counts.get(record.partition_key, 0) + 1
    return counts


def materialize_all(defs: dg.Definitions, instance: dg.DagsterInstance, partitions_per_run: int = 50):
    """Materialize the whole graph as `imagenet-int8 build --force` does; returns the run results.

    The manifest runs first: it registers the class partitions, which the batches then cover."""
    from imagenet_int8_assets.partitions import registered_classes

    job = defs.resolve_implicit_global_asset_job_def()
    results = [job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("raw_manifest")])]
    keys = registered_classes(instance)
    for start in range(0, len(keys), partitions_per_run):
        batch = keys[start : start + partitions_per_run]
        results.append(
            job.execute_in_process(
                instance=instance,
                asset_selection=[dg.AssetKey(k) for k in ("preprocessed_crops", "vae_latents", "mds_shards")],
                tags={
                    "dagster/asset_partition_range_start": batch[0],
                    "dagster/asset_partition_range_end": batch[-1],
                },
                raise_on_error=False,
            )
        )
    results.append(
        job.execute_in_process(
            instance=instance,
            asset_selection=[dg.AssetKey(k) for k in DATASET_STEPS],
            raise_on_error=False,
        )
    )
    return results
